# memfit: every task a developer or CI runs is a target here. `.venv/` is built on first use.
# On this machine `pip install torch==2.13.0` takes a CPU build from disk; elsewhere set TORCH_SPEC
# (e.g. TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128').
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.memfit-installed
PYTEST_ARGS ?=

.PHONY: setup test test-slow lint format demo bench clean

setup: $(STAMP)

# torch goes in first and alone, so that the range in pyproject.toml is already met and pip
# never reaches for a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

demo: $(STAMP)
	$(BIN)/memfit demo

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
