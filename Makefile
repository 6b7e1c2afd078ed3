# One command each for a fresh machine: `make train` and `make test`.
# TORCH_SPEC picks the torch build installed first. The default is the CPU build;
# with a GPU, e.g.: make train TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Torch first, so the project's `torch>=...` requirement is already satisfied by the CPU build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m llm_lightning.train task=sentiment $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check llm_lightning tests benchmarks
	$(VENV)/bin/ruff format --check llm_lightning tests benchmarks
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format llm_lightning tests benchmarks
	$(VENV)/bin/ruff check --fix llm_lightning tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
