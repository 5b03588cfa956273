# Set-up and checks. `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on these machines' local wheel store; any other spec may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?= transformers==5.24.0

.PHONY: demo test lint venv bench-convert fixtures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m automodel_convert.demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -x --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

fixtures: $(VENV)/.installed
	$(PY) fixtures/make_fixtures.py

bench-convert: $(VENV)/.installed
	$(PY) bench/convert_bench.py --layers 2 6

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
