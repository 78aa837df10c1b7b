# make install   create .venv and install requirements.txt + requirements-dev.txt
# make demo      train on the built-in demo set (installs first when .venv is missing)
# make test      ruff check, then the whole test suite (installs first when .venv is missing)
# make test-gpu  only the tests marked cuda (pytest -m cuda); fails, not skips, without a visible NVIDIA GPU
# make chaos     the fault-injection suite in full: kill -9 at 20 instants, full disks, two runs
#                (CHAOS_KILLS=20 and CHAOS_SEED=11 by default; make test runs it with 4 kills)
# make mutants   break the code one line at a time (tests/mutants.py) and check the tests fail
#                (MUTANTS="dice fsync" runs only those; a few minutes for all)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CHAOS_KILLS ?= 20
CHAOS_SEED ?= 11

.PHONY: install demo test test-gpu chaos mutants lint bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) gpu_train.py --demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

CUDA_CHECK := import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: make test-gpu needs a visible NVIDIA GPU (torch.cuda.is_available() is False)")

test-gpu: $(STAMP)
	@$(PY) -c '$(CUDA_CHECK)'
	$(PY) -m pytest -m cuda

chaos: $(STAMP)
	CHAOS_KILLS=$(CHAOS_KILLS) CHAOS_SEED=$(CHAOS_SEED) $(PY) -m pytest -m chaos tests/chaos

mutants: $(STAMP)
	$(PY) tests/mutants.py $(MUTANTS)

bench: $(STAMP)
	$(PY) bench/overhead.py

clean:
	rm -rf demo_output demo_data .pytest_cache .ruff_cache
