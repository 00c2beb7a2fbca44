# Every target creates .venv on first use, installing the CPU build of PyTorch
# before the project so that pip never resolves torch to a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench report kernels test-ort-oldest clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test,workloads]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m mfqat_onnx.demo

lint: $(STAMP)
	$(PY) -m ruff check mfqat_onnx models tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -n 2 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run_all.py

kernels: $(STAMP)
	$(PY) -m mfqat_onnx.runtime --build-kernels

test-ort-oldest: $(STAMP)
	bash custom_ops/test_oldest_ort.sh

clean:
	rm -rf $(VENV) build custom_ops/build .mfqat_cache
