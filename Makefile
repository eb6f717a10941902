# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow setup setup-dev lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes; editable, so code changes need no reinstall.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/mmkd demo

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check mmkd tests bench

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check mmkd tests bench
	$(PY) -m pytest -q

# The end-to-end runs that a faster test in `make test` already covers (marked slow); CI runs them after make test.
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m "slow and not gpu"

clean:
	rm -rf runs .pytest_cache
