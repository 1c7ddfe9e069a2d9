# Two commands on a fresh machine with Python 3.10+:
#   make bench   the main job: the benchmark suite (channelconv's algorithms against F.conv2d on ResNet-50's
#                layers, then three whole networks converted against nn.Conv2d)
#   make test    the test-suite
# Each creates .venv (torch and the test/bench tools) and builds the extension on first use;
# later runs rebuild only what changed.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXTENSION := $(VENV)/.extension-built
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PYTEST_ARGS ?=
BENCH_ARGS ?=
MODEL_ARGS ?= --models lenet,resnet18-fmnist,resnet20-cifar

.PHONY: test bench build clean

$(DEPS): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC) numpy setuptools wheel ninja \
		pytest hypothesis expecttest tqdm matplotlib onnx onnxruntime onnxscript opacus
	touch $@

$(EXTENSION): $(DEPS) $(SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(EXTENSION)

test: $(EXTENSION)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(EXTENSION)
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) -m benchmarks --suite models $(MODEL_ARGS)

clean:
	rm -rf build channelconv/_C*.so $(EXTENSION)
