# `make test`, `make demo` and `make eval` set themselves up from nothing: a .venv with the pinned
# requirements and the package installed in place with its C++ extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo eval test-gpu bench bench-cpu clean

$(STAMP): requirements-dev.txt pyproject.toml setup.py csrc/*.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

# The embedded default end to end: data and models are cached in demo/, the audit runs afresh.
demo:
	@start=$$(date +%s); $(MAKE) -s $(STAMP); echo "set-up: $$(( $$(date +%s) - start )) s"
	$(PY) -m gradaudit.toy.demo --root demo

# The evaluation on the tiny models (CPU, about 40 minutes; results in benchmarks/results/eval_tiny.*).
eval: $(STAMP)
	$(PY) benchmarks/eval_membership.py --root demo --out benchmarks/results

# On a CUDA machine whose python already has torch and triton (the GPU machine).
# The optional integrations' wheels (opacus, dattri) come along in .whl/ where the machine has no network.
test-gpu:
	python3 -m pip install -q --no-build-isolation --no-deps -e .
	if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/gradaudit-site .whl/*.whl; fi
	PYTHONPATH=/tmp/gradaudit-site GRADAUDIT_AUTOTUNE=0 python3 -m pytest -q -m gpu tests  # results, not speed: no tuning

bench:
	python3 benchmarks/bench_slice_stats.py --out benchmarks/results

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_cpu.py --out benchmarks/results

clean:
	rm -rf $(VENV) build *.egg-info gradaudit/_C*.so
