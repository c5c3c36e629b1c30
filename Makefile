# Every target runs from the project root. `make install` is idempotent.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test test-fast lint format clean

install:
	$(PIP) install -e ".[dev]"

demo: install
	lightning_simo study --config configs/synthetic/study.yaml

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

clean:
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
