# Quick start:  make demo   (installs, trains on the bundled data, writes CAM figures)
#               make test   (installs, runs the whole test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test install-train install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.train-installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[train]"
	touch $@

$(VENV)/.test-installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install-train: $(VENV)/.train-installed
install-test: $(VENV)/.test-installed

demo: install-train
	$(PY) -m train

test: install-test
	$(PY) -m pytest -n 2 -q

bench: install-test
	$(PY) benchmarks/bench_blocks.py

clean:
	rm -rf $(VENV) .pytest_cache
