# Two entry points for a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build: the default is the CPU wheel these machines carry;
# e.g. `make test TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Triton 2.51's server, Python backend and stubs; --no-deps: its Python side wants numpy<2.
PYTRITON_SPEC ?= nvidia-pytriton==0.7.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test,plot,serve]'
	$(BIN)/python -m pip install -q --no-deps $(PYTRITON_SPEC)
	$(BIN)/resnet-deploy serve --prepare
	touch $@

install: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/resnet-deploy serve --prepare  # the Triton stub env (a no-op once it is built)
	$(BIN)/ruff check resnet_deploy tests
	$(BIN)/isort --check-only resnet_deploy tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts/*.onnx artifacts/*.json artifacts/*.md artifacts/*.png artifacts/trt_cache
