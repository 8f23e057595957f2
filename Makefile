# The front door. Every target is a thin wrapper over `python -m stereo ...`; `make help` lists them.
SHELL := /bin/bash
PY    ?= .venv/bin/python
VENV  ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= tiny
NPROC ?= 1
# `make train CONFIG=x optim.lr=1e-5`: every command-line assignment whose name has a dot is a config override,
# passed on quoted as one word, so values may hold spaces (`make submit 'data.train=[{name: a, shards: b}]'`).
OVERRIDES := $(strip $(foreach v,$(sort $(.VARIABLES)),$(if $(and $(findstring .,$(v)),$(filter command line,$(origin $(v)))),'$(subst ','\'',$(v)=$(value $(v)))')) $(ARGS))
# Configs that read the demo shards get them written first (train, submit).
DEMO_SHARDS = if grep -qs 'shards/demo/' $(CONFIG) configs/$(CONFIG).yaml && [ ! -f shards/demo/train/manifest.json ]; then $(MAKE) --no-print-directory demo-data; fi

.PHONY: help setup test test-gpu gpu-check train demo-data shards bench bench-data bench-restart eval compare infer \
        export submit status logs cancel slurm-up slurm-down docker docker-build docker-run config clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done ## build .venv with pinned versions (CPU or GPU machine) and the local Slurm packages
	@bash slurm/local_cluster.sh install

$(VENV)/.setup-done: requirements.txt docker/install.sh pyproject.toml
	bash docker/install.sh $(VENV) "$(TORCH)"
	$(PY) -c "from stereo.train.engine import prebuild_ops; prebuild_ops()"
	touch $@

test: ## run the test suite (CPU; real DeepSpeed, webdataset, Slurm, wandb offline)
	$(PY) -m pytest -m "not gpu" tests

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
	@$(DEMO_SHARDS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m stereo train $(CONFIG) $(OVERRIDES)

config: ## print CONFIG fully resolved (validates it)
	$(PY) -m stereo config $(CONFIG) $(OVERRIDES)

shards: ## convert a data set: DATASET=kitti15 SRC=/data/KITTI OUT=shards/kitti15
	$(PY) -m stereo shards --dataset $(DATASET) --src $(SRC) --out $(OUT)

bench: ## time a training step and inference (GPU): median step, samples/s, peak memory, MFU
	$(PY) -m stereo bench --out runs/bench.json

bench-data: ## data-loading throughput per core on FSD-like samples
	$(PY) -m stereo bench-data

bench-restart: ## requeue to first resumed step of a tiny Slurm job, and where the time goes (make slurm-up first)
	@$(DEMO_SHARDS)
	$(PY) -m jobs.bench_restart $(OVERRIDES)

eval: ## evaluate: CKPT=... BENCH=kitti15 DATA=/data/KITTI [SIZE=vitl for a lone released file] [ITERS=32] [OUT=dir] [HIERA=1]
	$(PY) -m stereo eval --ckpt $(CKPT) --bench $(BENCH) --data $(DATA) $(if $(SIZE),--size $(SIZE)) \
		$(if $(ITERS),--iters $(ITERS)) $(if $(OUT),--out $(OUT)) $(if $(HIERA),--hierarchical)

compare: ## compare runs: RUNS="runs/a runs/b"
	$(PY) -m stereo compare $(RUNS)

infer: ## one pair: CKPT=... LEFT=... RIGHT=... OUT=... [HIERA=1 for large images]
	$(PY) -m stereo infer --ckpt $(CKPT) --left $(LEFT) --right $(RIGHT) --out $(OUT) $(if $(HIERA),--hierarchical)

export: ## released-format checkpoint from a run: RUN=runs/x OUT=model.pth
	$(PY) -m stereo export $(RUN) --out $(OUT) --ema

submit: ## submit CONFIG to Slurm (config, paths and Slurm checked first; ARGS=--no-check-paths for node-only data)
	@$(DEMO_SHARDS)
	$(PY) -m stereo submit $(CONFIG) $(OVERRIDES)

status: ## Slurm state (pending reason), newest checkpoint and step of the last submitted run (or RUN=...)
	$(PY) -m stereo status $(RUN)

logs: ## log of the last submitted run (or RUN=...)
	$(PY) -m stereo logs $(RUN)

cancel: ## cancel the last submitted run (or RUN=...)
	$(PY) -m stereo cancel $(RUN)

slurm-up: ## start the local two-node Slurm cluster (tests use it; STEREO_SLURM_NODES=1 for one node)
	bash slurm/local_cluster.sh up

slurm-down: ## stop the local Slurm cluster
	bash slurm/local_cluster.sh down

docker: docker-build ## alias of docker-build

docker-build: ## build the CUDA image (IMAGE=foundation-stereo:latest)
	docker build -t $(or $(IMAGE),foundation-stereo:latest) .

docker-run: ## run a subcommand in the image: make docker-run ARGS="train configs/stereo_v1.yaml"
	docker run --gpus all --ipc=host -v /data:/data -v $(CURDIR)/runs:/runs $(or $(IMAGE),foundation-stereo:latest) $(ARGS)

clean: ## remove runs, demo shards and caches (keeps .venv)
	rm -rf runs shards/demo .pytest_cache
