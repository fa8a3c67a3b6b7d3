# Two commands matter: `make night` and `make test`. Everything else is for developers.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export VENV

.PHONY: night test test-all lint bench setup clean

$(STAMP): pyproject.toml scripts/bootstrap
	@scripts/bootstrap

setup: $(STAMP)

night: $(STAMP)
	$(BIN)/ldf night $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m '' $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/ldf bench all $(ARGS)

clean:
	rm -rf $(VENV) ldf-data .pytest_cache .mypy_cache .ruff_cache
