# `make test` and `make bench` set themselves up from nothing: a .venv with the pinned
# requirements and the package installed in place with its C++ extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-gpu bench bench-cpu clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py csrc/*.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

# On a CUDA machine whose python already has torch and triton (the GPU machine).
test-gpu:
	python3 -m pip install -q --no-build-isolation --no-deps -e .
	python3 -m pytest -q -m gpu tests

bench:
	python3 benchmarks/bench_slice_stats.py --out benchmarks/results

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_cpu.py --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info gradaudit/_C*.so
