# The two commands of the README: `make demo` (quickstart experiment on CPU) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'

demo: install
	$(PY) -m experiments.run --config=configs/quickstart.py

test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests
