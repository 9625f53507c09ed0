# glm4 — fine-tune GLM-4 from Rust. `make test` works on a fresh clone:
# `setup` installs libtorch (PyTorch 2.11.0 from PyPI) into .venv by itself.

SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
C10D_STAMP := $(VENV)/.c10d-headers
REF_STAMP := $(VENV)/.reference-packages

# tch's build finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
CARGO ?= cargo
BIN := target/release/glm4

.PHONY: setup build test fixtures env clean-venv train demo dpo chat toolcall soak fuzz bench FORCE

# make train CONFIG=configs/lora_alpaca_b4.yaml ARGS="--learning_rate 1e-4 --max_steps 600"
CONFIG ?= configs/tutorial.yaml
ARGS ?=
MODEL ?= ./weights/glm-4-9b-hf
ADAPTER ?= ./output/lora-glm4-9b-alpaca
DATA ?=

setup: $(TORCH_STAMP) $(C10D_STAMP)

$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

# Headers the c10d shim (trl_like/csrc) compiles against that the torch wheel lacks:
# gloo's (Debian's libgloo-dev, unpacked into .venv/gloo; only headers are used,
# gloo itself is inside libtorch) and CUDA's crt/cccl for ProcessGroupNCCL.
$(C10D_STAMP): | $(TORCH_STAMP)
	rm -rf $(VENV)/gloo && mkdir -p $(VENV)/gloo
	cd $(VENV)/gloo && { apt-get download libgloo-dev 2>/dev/null || { apt-get update -qq && apt-get download libgloo-dev; }; }
	dpkg -x $(VENV)/gloo/libgloo-dev_*.deb $(VENV)/gloo
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
	touch $@

# `build` compiles everything `make test` runs (test targets, proptest, …);
# the commands that only run glm4 (demo, train, chat, toolcall, env) build just
# the binary, so a first `make demo` does not compile test targets it never runs.
build: setup
	$(CARGO) build --release --workspace --all-targets

$(BIN): setup FORCE
	$(CARGO) build --release -p glm4 --bin glm4

FORCE:

# The tests also run the Python reference (transformers, PEFT, TensorBoard) to
# check that Python opens what glm4 writes; it installs in a few seconds once.
test: build $(REF_STAMP)
	$(CARGO) test --release --workspace

env: $(BIN)
	$(BIN) env

# Long reliability runs (short versions are part of `make test`).
soak: build
	SOAK_STEPS=2000 $(CARGO) test --release -p glm4 --test soak -- --nocapture

fuzz: build
	PROPTEST_CASES=50000 $(CARGO) test --release -p trl_like --test fuzz

# The tutorial: LoRA on GLM-4-9B with the Chinese Alpaca-GPT4 data (downloads what is missing; needs CUDA).
# NPROC=8 trains data-parallel on 8 GPUs of this machine (torchrun + NCCL; docs/DISTRIBUTED.md);
# DEEPSPEED=configs/zero2.yaml adds ZeRO-2 with fp32 master weights (the tutorial's accelerate config).
NPROC ?= 1
DEEPSPEED ?=
LAUNCH = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --nproc_per_node $(NPROC) --no-python,)
train: $(BIN)
	$(LAUNCH) $(BIN) sft --config $(CONFIG) $(if $(DEEPSPEED),--deepspeed $(DEEPSPEED),) $(ARGS)

# The same pipeline offline on CPU: the embedded tiny GLM-4 learns the project's demo data.
demo: $(BIN)
	$(BIN) sft --config configs/demo.yaml --overwrite_output_dir true --predict_max_new_tokens 32 $(ARGS)

# Preference tuning (DPO) offline on CPU: the tiny GLM-4 and the project's own preference pairs
# (data/demo_dpo.json); rewards/margins and rewards/accuracies rise in the log.
dpo: $(BIN)
	$(BIN) dpo --config configs/dpo.yaml --overwrite_output_dir true --predict_max_new_tokens 24 $(ARGS)

# Chat with the base model plus the trained adapter (the tutorial's chat_cli.py).
chat: $(BIN)
	$(BIN) chat --model_name_or_path $(MODEL) --adapter_path $(ADAPTER) $(ARGS)

# The tool-call variant (toolcall_train.py): glaive conversations with tools, 10 epochs, 128 tokens.
toolcall: $(BIN)
	$(BIN) sft --config configs/toolcall.yaml --predict_max_new_tokens 128 \
		--predict_prompt "你叫什么名字？" --predict_prompt "告诉我北京的天气怎么样？" \
		--predict_tools configs/toolcall_predict_tools.json $(if $(DATA),--data_files $(DATA)) $(ARGS)

# Regenerates the tiny models and the transformers fixtures (needs PyPI).
$(REF_STAMP): scripts/requirements-ref.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-ref.txt
	touch $@

fixtures: $(REF_STAMP)
	$(PYTHON) scripts/make_tiny_models.py
	$(PYTHON) scripts/make_fixtures.py
	$(PYTHON) scripts/make_generation_fixtures.py
	$(PYTHON) scripts/make_demo_data.py
	$(PYTHON) scripts/make_trainer_fixtures.py
	$(PYTHON) scripts/make_dpo_fixtures.py
	$(PYTHON) scripts/make_packing_fixtures.py
	$(PYTHON) scripts/make_callback_fixture.py
	$(PYTHON) scripts/make_quant_fixtures.py
	$(PYTHON) scripts/make_qlora_fixtures.py

clean-venv:
	rm -rf $(VENV)

# Issue 6's CPU comparison: glm4 bench vs TRL SFTTrainer + PEFT on the same work
# (small GLM-4, LoRA q/k/v, 64 alpaca_zh records, batch 4, fp32), each side in its
# own process; prints tokens/s, s/step, peak RSS and the Rust/TRL ratios.
# Rows with gradient_checkpointing off and on, each with padded and padding-free
# batches; about 9 minutes on 2 quiet cores (BENCH_ARGS="--gc off" halves it,
# "--modes padded,padding_free,packing" adds bfd packing; see scripts/bench.py --help).
BENCH_ARGS ?=
bench: build $(REF_STAMP)
	$(PYTHON) scripts/bench.py $(BENCH_ARGS)
