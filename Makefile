# Quick start:  make demo   (installs, trains on the bundled data, writes CAM figures)
#               make test   (installs, runs lint, types and the whole test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
YOLOV5_TEST := requirements/yolov5-test.txt
# the YOLOv5 7.0 package (AGPL, test-only parity reference) and its helper, installed without their deps
YOLOV5_NODEPS := yolov5==7.0.14 ultralytics==8.4.190

.PHONY: demo demo-detect test test-fast lint install-train install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.train-installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[train]"
	touch $@

$(VENV)/.test-installed: $(VENV)/bin/python pyproject.toml $(CONSTRAINTS) $(YOLOV5_TEST)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test]"
	$(PIP) install --quiet --no-deps $(YOLOV5_NODEPS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -r $(YOLOV5_TEST)
	touch $@

install-train: $(VENV)/.train-installed
install-test: $(VENV)/.test-installed

demo: install-train
	$(PY) -m train

# YOLOv5 (width 1/8) without attention and with CBAM on digit scenes: mAP table and per-detection CAM figures
demo-detect: install-train
	$(PY) -m train detect

# lint and types first (seconds), then the whole suite
lint: install-test
	$(PY) -m ruff check flax_attn train
	$(PY) -m mypy

# the whole suite, slow cases included (what CI runs); the 25 slowest are listed so that budget creep shows
test: lint
	$(PY) -m pytest -n 2 -q --durations=25

# everything but the cases marked slow (the day-to-day run, kept under 15 minutes on 2 cores)
test-fast: lint
	$(PY) -m pytest -n 2 -q -m "not slow" --durations=25

bench: install-test
	$(PY) benchmarks/bench_blocks.py

clean:
	rm -rf $(VENV) .pytest_cache
