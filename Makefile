# Everything a newcomer needs: `make train` and `make test` (also `make demo`).
# Both build .venv on first use from python3.12 and the pinned constraints.txt.
# Flags for the trainer go through ARGS: make train ARGS="--run.steps=400".

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# python3.12 may be a pyenv shim that refuses to run when 3.12 is not the global version,
# so try each candidate and keep the first that actually starts.
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
    /usr/local/bin/python3.12 /usr/bin/python3.12; do \
    $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)

.PHONY: train demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@if [ -z "$(PYTHON312)" ]; then echo "error: python3.12 not found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(PY) -m train $(ARGS)

demo: $(VENV)/.installed
	$(PY) -m jax_packmamba.demo

# Lint and format check (rules in pyproject.toml's [tool.ruff]) before the tests. Each test
# module runs whole on one worker (its compiled programs and module fixtures made once), the
# longest modules first (tests/conftest.py's SLOW_MODULES).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q tests

clean:
	rm -rf $(VENV)
