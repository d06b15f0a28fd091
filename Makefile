# The two commands of the README: `make demo` and `make test`. Everything else here serves them.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip's config here points at local folders it warns about on every call; keep the output readable
# without hiding pip's exit status (pipefail).
QUIET := 2>&1 | (grep -v "is ignored: it is neither" || true)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.scalekd-installed
# The CPU wheel on these hosts; the GPU image installs the CUDA build of the same version instead.
TORCH_SPEC ?= torch==2.13.0+cpu

.PHONY: demo test test-fast install lint bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml tools/torchvision_cpu_compat.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(QUIET)
	$(PY) -m pip install -q -r requirements-dev.txt $(QUIET)
	$(PY) -m pip install -q --no-deps -e . $(QUIET)
	# The checkout on the venv's path: pipelines/ and components/ are not in the package (pyproject.toml).
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/scalekd-checkout.pth"
	$(PY) tools/torchvision_cpu_compat.py
	$(PY) tools/check_install.py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/scalekd demo

# Two pytest-xdist workers (CI has 2 cores): much of the suite waits on process start-up (Ray, kfp's runner,
# the CLI), which the other worker fills; tests that share a module fixture stay on one worker (xdist_group).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 tests

# The unit tests alone (in-process and quick; tests/conftest.py marks unit, integration and cluster): under a
# minute on a 2-core machine, for the edit-test loop. `make test` runs them all.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m unit tests

# ruff with RUF100: a noqa that silences nothing is an error too; mypy on the library (pyproject.toml's [tool.mypy]).
lint: $(STAMP)
	$(VENV)/bin/ruff check scalekd components pipelines tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/machine.py && $(PY) benchmarks/cost.py && $(PY) benchmarks/eval_speed.py && $(PY) benchmarks/loader.py \
		&& $(PY) benchmarks/quality.py --shared-teacher --datasets synth && $(PY) benchmarks/headline.py \
		&& $(PY) benchmarks/assistant.py && $(PY) benchmarks/assignment.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
