# One virtual environment, .venv, holds everything: `make install` then `make test`.
PY ?= .venv/bin/python

.PHONY: install test test-slow lint bench

install:
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" -c constraints.txt

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench:
	$(PY) benchmarks/run.py
