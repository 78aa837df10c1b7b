# make install   create .venv and install requirements.txt + requirements-dev.txt
# make demo      train on the built-in demo set (installs first when .venv is missing)
# make test      ruff check, then the whole test suite (installs first when .venv is missing)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

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

bench: $(STAMP)
	$(PY) bench/overhead.py

clean:
	rm -rf demo_output demo_data .pytest_cache .ruff_cache
