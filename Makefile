# glm4 — fine-tune GLM-4 from Rust. `make test` works on a fresh clone:
# `setup` installs libtorch (PyTorch 2.11.0 from PyPI) into .venv by itself.

SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)
REF_STAMP := $(VENV)/.reference-packages

# tch's build finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH).
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
CARGO ?= cargo
BIN := target/release/glm4

.PHONY: setup build test fixtures env clean-venv

setup: $(TORCH_STAMP)

$(TORCH_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

build: setup
	$(CARGO) build --release --workspace --all-targets

# The tests also run the Python reference (transformers, PEFT, TensorBoard) to
# check that Python opens what glm4 writes; it installs in a few seconds once.
test: build $(REF_STAMP)
	$(CARGO) test --release --workspace

env: build
	$(BIN) env

# Regenerates the tiny models and the transformers fixtures (needs PyPI).
$(REF_STAMP): scripts/requirements-ref.txt $(TORCH_STAMP)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-ref.txt
	touch $@

fixtures: $(REF_STAMP)
	$(PYTHON) scripts/make_tiny_models.py
	$(PYTHON) scripts/make_fixtures.py

clean-venv:
	rm -rf $(VENV)
