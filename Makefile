# The front door. Every target is a thin wrapper over `python -m stereo ...`; `make help` lists them.
SHELL := /bin/bash
PY    ?= .venv/bin/python
VENV  ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= tiny
NPROC ?= 1
# `make train CONFIG=x optim.lr=1e-5`: every command-line assignment whose name has a dot is a config override.
OVERRIDES := $(strip $(foreach w,$(MAKEOVERRIDES),$(if $(findstring .,$(firstword $(subst =, ,$(w)))),$(w))) $(ARGS))

.PHONY: help setup test test-gpu gpu-check train demo-data shards bench bench-data eval compare infer export \
        submit status logs cancel slurm-up slurm-down docker docker-build docker-run docker-test config clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done ## build .venv with pinned versions (CPU or GPU machine) and the local Slurm packages
	@bash slurm/local_cluster.sh install

$(VENV)/.setup-done: requirements.txt docker/install.sh pyproject.toml
	bash docker/install.sh $(VENV) "$(TORCH)"
	$(PY) -c "from stereo.train.engine import prebuild_ops; prebuild_ops()"
	touch $@

test: ## run the test suite (CPU; real DeepSpeed, webdataset, Slurm, wandb offline)
	$(PY) -m pytest -m "not gpu and not docker" tests

test-gpu: ## run the GPU-marked tests (on a GPU node)
	$(PY) -m pytest -m gpu tests

gpu-check: ## on a GPU node: the gpu tests, `bench` eager and compiled, a ViT-L ZeRO-2 bf16 run (runs/gpu-check)
	rm -rf runs/gpu-check
	$(MAKE) --no-print-directory test-gpu
	$(PY) -m stereo bench --out runs/gpu-check/bench.json
	$(PY) -m stereo bench --compile --channels-last --out runs/gpu-check/bench-compiled.json
	$(MAKE) --no-print-directory train CONFIG=vitl_smoke NPROC=1 train.run_dir=runs/gpu-check/vitl_smoke

demo-data: ## write the procedurally generated demo shards to shards/demo
	$(PY) -m stereo demo-data --out shards/demo

train: ## train CONFIG (default tiny: demo shards, CPU, a few minutes); overrides as a.b=value
	@if grep -qs 'shards/demo/' $(CONFIG) configs/$(CONFIG).yaml && [ ! -f shards/demo/train/manifest.json ]; then \
		$(MAKE) --no-print-directory demo-data; fi
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m stereo train $(CONFIG) $(OVERRIDES)

config: ## print CONFIG fully resolved (validates it)
	$(PY) -m stereo config $(CONFIG) $(OVERRIDES)

shards: ## convert a data set: DATASET=kitti15 SRC=/data/KITTI OUT=shards/kitti15
	$(PY) -m stereo shards --dataset $(DATASET) --src $(SRC) --out $(OUT)

bench: ## time a training step and inference (GPU): median step, samples/s, peak memory, MFU
	$(PY) -m stereo bench --out runs/bench.json

bench-data: ## data-loading throughput per core on FSD-like samples
	$(PY) -m stereo bench-data

eval: ## evaluate: CKPT=... BENCH=kitti15 DATA=/data/KITTI [SIZE=vitl for a lone released file] [ITERS=32] [OUT=dir] [HIERA=1]
	$(PY) -m stereo eval --ckpt $(CKPT) --bench $(BENCH) --data $(DATA) $(if $(SIZE),--size $(SIZE)) \
		$(if $(ITERS),--iters $(ITERS)) $(if $(OUT),--out $(OUT)) $(if $(HIERA),--hierarchical)

compare: ## compare runs: RUNS="runs/a runs/b"
	$(PY) -m stereo compare $(RUNS)

infer: ## one pair: CKPT=... LEFT=... RIGHT=... OUT=... [HIERA=1 for large images]
	$(PY) -m stereo infer --ckpt $(CKPT) --left $(LEFT) --right $(RIGHT) --out $(OUT) $(if $(HIERA),--hierarchical)

export: ## released-format checkpoint from a run: RUN=runs/x OUT=model.pth
	$(PY) -m stereo export $(RUN) --out $(OUT) --ema

submit: ## submit CONFIG to Slurm through submitit (validated first)
	$(PY) -m stereo submit $(CONFIG) $(OVERRIDES)

status: ## Slurm state of the last submitted run (or RUN=...)
	$(PY) -m stereo status $(RUN)

logs: ## log of the last submitted run (or RUN=...)
	$(PY) -m stereo logs $(RUN)

cancel: ## cancel the last submitted run (or RUN=...)
	$(PY) -m stereo cancel $(RUN)

slurm-up: ## start the single-node local Slurm cluster (tests use it)
	bash slurm/local_cluster.sh up

slurm-down: ## stop the local Slurm cluster
	bash slurm/local_cluster.sh down

docker: docker-build ## alias of docker-build

IMAGE ?= foundation-stereo:latest
# --gpus for `docker run`: all when nvidia-smi sees a GPU here, else none; GPUS=2, GPUS='"device=0,1"' or GPUS= to choose
GPUS ?= $(if $(shell nvidia-smi -L 2>/dev/null),all)
DATA ?= /data

docker-build: ## build the CUDA image (IMAGE=foundation-stereo:latest); docs/container.md
	bash docker/build.sh cuda $(IMAGE)

docker-run: ## run a command in the image as you, runs/ and DATA=/data mounted: ARGS="train configs/stereo_v1.yaml" [GPUS=all]
	@mkdir -p runs
	docker run --rm --ipc=host $(if $(GPUS),--gpus $(GPUS)) --user "$$(id -u):$$(id -g)" \
		$(if $(wildcard $(DATA)),-v $(abspath $(DATA)):/data) -v $(CURDIR)/runs:/runs $(IMAGE) $(ARGS)

docker-test: ## build the CPU image and run the demo, tests and a Slurm job in it (30-60 min; not in `make test`)
	PY=$(PY) bash docker/test.sh

clean: ## remove runs, demo shards and caches (keeps .venv)
	rm -rf runs shards/demo .pytest_cache
