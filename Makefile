# cce_patch — developer entry points. `make test` works on a fresh CPU machine: it creates .venv,
# installs the project with its test extra (the core plus every optional package the tests import: see
# pyproject.toml), and runs pytest with Triton's CPU interpreter.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On machines without an NVIDIA GPU, pin torch to the local CPU wheel so pip never downloads the
# multi-GB CUDA build. Machines with a GPU (and users) keep whatever torch they choose.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# DS_BUILD_OPS=0: deepspeed (a test extra) installs as pure Python; it compiles an op only when one is used.
ifeq ($(HAS_GPU),1)
PIP_ENV := DS_BUILD_OPS=0
else
PIP_ENV := DS_BUILD_OPS=0 PIP_CONSTRAINT=$(CURDIR)/constraints-cpu.txt
endif
PYTEST_ARGS ?=
# The oldest transformers the project declares (pyproject: >=4.57,<6) gets its own, smaller lane: the model
# room's tests and the census, where the version matters, and the core-only install (tests/test_packaging.py).
COMPAT_VENV ?= .venv-transformers-4.57
COMPAT_TRANSFORMERS ?= transformers==4.57.6
COMPAT_TESTS ?= tests/test_models_patch.py tests/test_models_peft.py tests/test_models_families.py tests/test_census.py tests/test_trainer.py tests/test_packaging.py

.PHONY: install test test-main test-compat lint finetune bench gpu clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(BIN)/python -m pip install -q --upgrade pip
	$(PIP_ENV) $(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(COMPAT_VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(PIP_ENV) $(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	$(PIP_ENV) $(COMPAT_VENV)/bin/python -m pip install -q -e '.[test]' '$(COMPAT_TRANSFORMERS)'
	touch $@

## Run the test suite (CPU; GPU-marked tests skip): the whole suite on the transformers pip resolves, then the
## model tests on the oldest declared transformers. Triton kernels run under TRITON_INTERPRET=1.
test: test-main test-compat

test-main: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS) tests

test-compat: $(COMPAT_VENV)/.installed
	TRITON_INTERPRET=1 $(COMPAT_VENV)/bin/python -m pytest -q --timeout=900 $(PYTEST_ARGS) $(COMPAT_TESTS)

lint: install
	$(BIN)/ruff check cce_patch tests recipes

## The main job: fine-tune on the embedded offline default (tiny model, generated data), on CPU.
finetune: install
	$(BIN)/accelerate launch --num_processes 1 --cpu recipes/finetune_alpaca.py

## GPU tests + benchmarks (run on a CUDA machine); results under $$OUT (default ./outputs/gpu).
gpu:
	bash tests/gpu/run_all.sh

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache outputs
