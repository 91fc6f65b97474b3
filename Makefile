# Two commands set everything up on a fresh machine:
#   make train   creates .venv, installs fastcnn and trains SimpleCNN on MNIST (fast preset)
#   make test    creates .venv, installs fastcnn with its dev extras and runs the test suite
PYTHON ?= python3
VENV ?= .venv
# The CUDA-enabled builds; on the project's CPU machines pip takes them from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export FASTCNN_DATA ?= $(abspath $(firstword $(wildcard ../shared/data) data))
BIN := $(VENV)/bin

.PHONY: install train test bench lint clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py kernels/conv_relu_pool_cpu.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

train: install
	$(BIN)/fastcnn train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/fastcnn bench $(ARGS)

lint: install
	$(BIN)/ruff check fastcnn kernels tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
