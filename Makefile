# Set-up and checks. `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on these machines' local wheel store; any other spec may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?= transformers==5.24.0

.PHONY: demo test lint venv bench-convert fixtures clean repeat-dist

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)" "$(TRANSFORMERS_SPEC)"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m automodel_convert.demo

# No -x: a newcomer sees every failure, not the first one. Multi-process tests start their ranks through
# tests/spawn_ranks.py (own rendezvous port per call, results as files, a deadline that fails loudly), and
# pytest-timeout (pyproject) fails any single test that hangs instead of stalling CI. lint-imports: the layers
# (pyproject [tool.importlinter]) point down only.
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15

# `ruff check` is the lint gate (it fails CI). `ruff format` is not used: the code base keeps its own line layout.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The multi-process tests N times in a row (issue 13's determinism check): make repeat-dist N=20
N ?= 20
K ?=
repeat-dist: $(VENV)/.installed
	$(PY) -m pytest -q -p no:randomly --count $(N) tests/test_ep_dispatch.py tests/test_ep_train.py \
		tests/test_parallel_load_save.py "tests/test_train.py::test_ep2_save_resume_and_transformers_logits" \
		tests/test_ep_head_reduce.py tests/test_ep_overlap_optimizer.py tests/test_parallel_save_failures.py \
		tests/test_spawn_ranks.py tests/test_train_checkpoint.py tests/test_train_control.py tests/test_train_data.py \
		tests/test_models_recompute.py -k "$(K)"

fixtures: $(VENV)/.installed
	$(PY) fixtures/make_fixtures.py

bench-convert: $(VENV)/.installed
	$(PY) bench/convert_bench.py --layers 2 6

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
