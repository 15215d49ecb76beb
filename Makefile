# The two commands a newcomer needs: `make demo` (save and restore a memory region)
# and `make test` (the whole test suite). Both build .venv from scratch when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint schema bench mutants clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check migd tests examples
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/migd schema --check

test: lint
	$(BIN)/python -m pytest -q

# Plants each bug of tests/mutants.py in a copy of the tree and checks that its tests
# fail (about 3 minutes here); never part of `make test`.
mutants: $(STAMP)
	$(BIN)/python -m tests.mutants

# The real benchmark (about 16 minutes here); never part of `make test`.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/migd bench --size-gib 4 --runs 3 --out docs/bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .import_linter_cache
