# The front door. Most targets are thin wrappers over `python -m stereo ...` (test: pytest; gpu-check and bench-restart:
# their own modules; slurm-*, docker-*: scripts); `make help` lists them.
SHELL := /bin/bash
PY    ?= .venv/bin/python
VENV  ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= tiny
NPROC ?= 1
PAIR  := shards/demo/motorcycle
# `make train CONFIG=x optim.lr=1e-5`: every command-line assignment whose name is in lower case is a config
# override, passed on quoted as one word, so values may hold spaces (`make submit 'data.train=[{name: a, shards: b}]'`);
# the config check refuses one without its section (`steps=10`: did you mean train.steps=10?).
UPPER := A B C D E F G H I J K L M N O P Q R S T U V W X Y Z
lower_case = $(if $(strip $(foreach c,$(UPPER),$(findstring $(c),$(1)))),,$(1))
OVERRIDES := $(strip $(foreach v,$(sort $(.VARIABLES)),$(if $(and $(call lower_case,$(v)),$(filter command line,$(origin $(v)))),'$(subst ','\'',$(v)=$(value $(v)))')) $(ARGS))
# Configs that read the demo shards get them written first (train, submit).
DEMO_SHARDS = if grep -qs 'shards/demo/' $(CONFIG) configs/$(CONFIG).yaml && [ ! -f shards/demo/train/manifest.json ]; then $(MAKE) --no-print-directory demo-data; fi

# A fresh clone: targets that run Python say what to do instead of ".venv/bin/python: No such file or directory".
NO_PYTHON := help setup clean slurm-up slurm-down docker docker-build docker-run
ifeq ($(filter setup,$(MAKECMDGOALS)),)
ifneq ($(filter-out $(NO_PYTHON),$(or $(MAKECMDGOALS),help)),)
ifeq ($(shell command -v $(PY)),)
$(error $(PY) not found: run `make setup` first)
endif
endif
endif
# $(call q,VALUE): one shell word, so that paths with spaces or quotes reach Python whole.
q = '$(subst ','\'',$(1))'
# $(call require,VARIABLES,example): stops a target before Python starts, naming what is missing.
missing = $(strip $(foreach v,$(1),$(if $($(v)),,$(v))))
require = $(if $(call missing,$(1)),$(error make $@ needs $(call missing,$(1)), for example: $(2)))

.PHONY: help setup test test-deploy-large test-inductor test-gpu gpu-check train resume demo-data demo-pair shards shards-upload plan bench \
        bench-data bench-restart eval compare infer export export-onnx mlflow-upload submit status logs cancel sweep \
        sweep-status slurm-up slurm-down docker docker-build \
        docker-run docker-test config clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done ## build .venv with pinned versions (CPU or GPU machine) and the local Slurm packages
	@bash slurm/local_cluster.sh install

$(VENV)/.setup-done: requirements.txt docker/install.sh pyproject.toml
	bash docker/install.sh $(VENV) "$(TORCH)"
	$(PY) -c "from stereo.train.engine import prebuild_ops; prebuild_ops()"
	touch $@

test: ## run the test suite (CPU; real DeepSpeed, webdataset, Slurm, wandb offline, an MLflow server)
	$(PY) -m pytest -m "not gpu and not docker and not deploy_large and not inductor" tests

test-inductor: ## compiled-vs-eager parity and the kill -9 resume of a compiled run through Inductor (CPU; ~10 min)
	$(PY) -m pytest -m inductor tests

test-deploy-large: ## ViT-L ONNX parity and the fp16 export at full Middlebury size (CPU; ~20 min, ~16 GB memory)
	$(PY) -m pytest -m deploy_large tests

test-gpu: ## run the GPU-marked tests (on a GPU node)
	$(PY) -m pytest -m gpu tests

gpu-check: ## a new GPU node in ~8 min: bf16 ViT-L steps vs the plan, gpu tests, ZeRO-2 resume, bench [RELEASED=dir DINOV2=dir]
	$(PY) -m stereo.gpu_check $(if $(RELEASED),--released $(RELEASED)) $(if $(DINOV2),--dinov2 $(DINOV2)) $(ARGS)

demo-data: ## write the procedurally generated demo shards to shards/demo
	$(PY) -m stereo demo-data --out shards/demo

demo-pair: ## write the Middlebury motorcycle pair bundled with scikit-image to shards/demo/motorcycle (for infer)
	$(PY) -m stereo demo-pair --out $(PAIR)

train: ## train CONFIG (default tiny: demo shards, CPU, ~3 min on 2 cores); overrides as a.b=value; NPROC=n: torchrun
	@$(PY) -m stereo config --check $(CONFIG) $(OVERRIDES)
	@$(DEMO_SHARDS)
	$(if $(filter 1,$(NPROC)),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)) -m stereo train $(CONFIG) $(OVERRIDES)

# the newest run directory that a training run wrote (for `make resume` without RUN)
LAST_RUN = $(patsubst %/config.yaml,%,$(firstword $(shell ls -t runs/*/config.yaml 2>/dev/null)))
resume: ## continue a stopped run from its newest checkpoint: RUN=runs/x (default: the newest in runs/) [NPROC=n] [a.b=value]
	$(if $(or $(RUN),$(LAST_RUN)),,$(error make resume: no run directory in runs/; name one: make resume RUN=runs/x))
	$(if $(filter 1,$(NPROC)),$(PY),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC)) -m stereo train \
		$(call q,$(or $(RUN),$(LAST_RUN))/config.yaml) $(call q,train.run_dir=$(or $(RUN),$(LAST_RUN))) $(OVERRIDES)

config: ## print CONFIG fully resolved (validates it)
	$(PY) -m stereo config $(CONFIG) $(OVERRIDES)

shards: ## convert a data set: DATASET=kitti15 SRC=/data/KITTI OUT=shards/kitti15 (or s3://bucket/kitti15) [SHARD_SIZE=1GB]
	$(PY) -m stereo shards --dataset $(DATASET) --src $(SRC) --out $(OUT) $(if $(SHARD_SIZE),--shard-size $(SHARD_SIZE))

shards-upload: ## upload built shards: SRC=shards/kitti15 OUT=s3://bucket/kitti15 (endpoint, credentials: AWS_* env)
	$(call require,SRC OUT,make shards-upload SRC=shards/kitti15 OUT=s3://bucket/kitti15)
	$(PY) -m stereo shards-upload --src $(SRC) --out $(OUT)

plan: ## per-GPU memory by part, largest batch, time floor of CONFIG [GPU=h100-80gb] [GPUS=n] (CPU; ~20 s a ViT-L plan); INFER=HxW [PRECISION=bf16]: inference peak, largest image
	$(PY) -m stereo plan $(CONFIG) $(OVERRIDES) $(if $(GPU),--gpu $(GPU)) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(INFER),--infer $(INFER) $(if $(PRECISION),--precision $(PRECISION)))

bench: ## time a training step and inference of the model that fits the device found (CPU: tiny) [SIZE=vitl|vitb|vits|tiny] [ONNX="tiny vits": + onnxruntime vs eager on the CPU]
	$(PY) -m stereo bench $(if $(SIZE),--size $(SIZE)) $(if $(ONNX),--onnx $(ONNX)) --out runs/bench.json

bench-data: ## data-loading throughput per core at FSD's 1280x720, vs a plain cv2 loader [OUT=figures.json]
	OMP_NUM_THREADS=1 $(PY) -m stereo bench-data $(if $(OUT),--out $(OUT))

bench-restart: ## requeue to first resumed step of a tiny Slurm job, and where the time goes (make slurm-up first)
	@$(DEMO_SHARDS)
	$(PY) -m jobs.bench_restart $(OVERRIDES)

eval: ## evaluate: CKPT=... BENCH=kitti15 DATA=/data/KITTI (BENCH=demo: the demo val shards) [SIZE=vitl] [ITERS=32] [OUT=dir] [HIERA=1]
	$(call require,CKPT BENCH $(if $(filter-out demo,$(BENCH)),DATA),make eval CKPT=runs/demo BENCH=demo or make eval CKPT=model.pth BENCH=kitti15 DATA=/data/KITTI)
	$(PY) -m stereo eval --ckpt $(call q,$(CKPT)) --bench $(BENCH) $(if $(DATA),--data $(call q,$(DATA))) $(if $(SIZE),--size $(SIZE)) \
		$(if $(ITERS),--iters $(ITERS)) $(if $(OUT),--out $(call q,$(OUT))) $(if $(HIERA),--hierarchical)

compare: ## compare runs: RUNS="runs/a runs/b", or rank a sweep's trials: SWEEP=configs/sweeps/x.yaml
	$(PY) -m stereo compare $(if $(SWEEP),--sweep $(SWEEP)) $(RUNS)

infer: ## one pair: CKPT=... LEFT=... RIGHT=... OUT=... [HIERA=1 for large images] [ENGINE=onnx CKPT=model.onnx]
	$(call require,CKPT LEFT RIGHT OUT,make infer CKPT=runs/demo LEFT=$(PAIR)/left.png RIGHT=$(PAIR)/right.png OUT=runs/demo/motorcycle)
	$(PY) -m stereo infer --ckpt $(call q,$(CKPT)) --left $(call q,$(LEFT)) --right $(call q,$(RIGHT)) --out $(call q,$(OUT)) $(if $(HIERA),--hierarchical) \
		$(if $(ENGINE),--engine $(ENGINE))

export: ## released-format checkpoint from a run: RUN=runs/x OUT=model.pth [MLFLOW=1: attach it to the run's MLflow run]
	$(call require,RUN OUT,make export RUN=runs/demo OUT=runs/demo/model.pth)
	$(PY) -m stereo export $(call q,$(RUN)) --out $(call q,$(OUT)) --ema $(if $(MLFLOW),--mlflow)

mlflow-upload: ## send a run's metrics.jsonl, pictures, config to MLflow later: RUN=runs/x [URI=http://host:5000]
	$(call require,RUN,make mlflow-upload RUN=runs/demo URI=http://127.0.0.1:5000)
	$(PY) -m stereo mlflow-upload $(call q,$(RUN)) $(if $(URI),--tracking-uri $(call q,$(URI)))

export-onnx: ## ONNX graph (any size, multiples of 32) + JSON sidecar: RUN=runs/x|model.pth|released-folder OUT=model.onnx [ITERS=n] [HIERA=1] [FP16=1] [ARGS=...]
	$(call require,RUN OUT,make export-onnx RUN=runs/demo OUT=runs/demo/model.onnx)
	$(PY) -m stereo export-onnx $(RUN) --out $(OUT) $(if $(ITERS),--iters $(ITERS)) $(if $(HIERA),--hierarchical) \
		$(if $(FP16),--precision fp16) $(ARGS)

submit: ## submit CONFIG to Slurm (config, paths and Slurm checked first; ARGS=--no-check-paths for node-only data)
	@$(DEMO_SHARDS)
	$(PY) -m stereo submit $(CONFIG) $(OVERRIDES)

status: ## Slurm state (pending reason), newest checkpoint and step of the last submitted run (or RUN=...)
	$(PY) -m stereo status $(if $(RUN),$(call q,$(RUN)))

logs: ## log of the last submitted run (or RUN=...)
	$(PY) -m stereo logs $(if $(RUN),$(call q,$(RUN)))

cancel: ## cancel the last submitted run (or RUN=...)
	$(PY) -m stereo cancel $(if $(RUN),$(call q,$(RUN)))

sweep: ## hyper-parameter sweep as one Slurm job array: SWEEP=configs/sweeps/x.yaml [LOCAL=1: run here] [a.b=value]
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=configs/sweeps/<name>.yaml [LOCAL=1] [a.b=value ...]" >&2; exit 2; }
	@if grep -qsE '^config: *tiny *$$' $(SWEEP) configs/sweeps/$(SWEEP).yaml && [ ! -f shards/demo/train/manifest.json ]; then \
		$(MAKE) --no-print-directory demo-data; fi
	$(PY) -m stereo sweep $(if $(LOCAL),--local) $(SWEEP) $(OVERRIDES)

sweep-status: ## a sweep's trials: state, step, best metric so far (SWEEP=...)
	@test -n "$(SWEEP)" || { echo "usage: make sweep-status SWEEP=configs/sweeps/<name>.yaml" >&2; exit 2; }
	$(PY) -m stereo sweep-status $(SWEEP)

slurm-up: ## start the local two-node Slurm cluster (tests use it; STEREO_SLURM_NODES=1 for one node)
	bash slurm/local_cluster.sh up

slurm-down: ## stop the local Slurm cluster
	bash slurm/local_cluster.sh down

docker: docker-build ## alias of docker-build

IMAGE ?= foundation-stereo:latest
# docker-run's --gpus: all when nvidia-smi sees a GPU here, else none; GPUS=2, GPUS='"device=0,1"' or GPUS= to choose
# (set inside the recipe: GPUS and DATA mean other things to plan and eval)
docker_gpus = $(if $(filter undefined,$(origin GPUS)),$(if $(shell nvidia-smi -L 2>/dev/null),all),$(GPUS))
docker_data = $(or $(DATA),/data)

docker-build: ## build the CUDA image (IMAGE=foundation-stereo:latest); docs/container.md
	bash docker/build.sh cuda $(IMAGE)

docker-run: ## run a command in the image as you, runs/ and DATA=/data mounted: ARGS="train configs/stereo_v1.yaml" [GPUS=all]
	@mkdir -p runs
	docker run --rm --ipc=host $(if $(docker_gpus),--gpus $(docker_gpus)) --user "$$(id -u):$$(id -g)" \
		$(if $(wildcard $(docker_data)),-v $(abspath $(docker_data)):/data) -v $(CURDIR)/runs:/runs $(IMAGE) $(ARGS)

docker-test: ## build the CPU image and run the demo, tests and a Slurm job in it (30-60 min; not in `make test`)
	PY=$(PY) bash docker/test.sh

clean: ## remove runs, demo shards and caches (keeps .venv)
	rm -rf runs shards/demo .pytest_cache
