# One virtual environment, .venv, holds everything: `make install` then `make test`.
PY ?= .venv/bin/python

.PHONY: install test test-slow lint bench repro

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

# every method on the digits at one shared budget, two processes at once, then the compare table
# (runs/reproduce_digits/reproduce.md; ~50 min on 2 cores; README "One-command digits reproduction")
repro:
	$(PY) benchmarks/reproduce_digits.py --steps 2000 --jobs 2
