# The two commands a new user needs: `make demo` and `make test`.
# Each sets up what it needs on first use: a virtual environment in .venv with
# a CPU build of torch, mc-gguf itself, and the patched llama.cpp runtime
# (built once, then installed from the wheel cached in ~/.cache/mc-gguf).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch, installed before anything else asks for torch: an
# unpinned torch would pull a CUDA build of several GB. On this project's
# machines torch==2.13.0 resolves to a local CPU wheel; elsewhere point pip at
# a CPU index (PIP_EXTRA_INDEX_URL) or set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-bench test-vulkan check-patches fuzz setup runtime clean

demo: runtime
	$(BIN)/mc-gguf demo --workdir build/demo

test: runtime
	$(BIN)/python -m pytest tests -m "not bench and not vulkan"

# The benchmark scripts' --quick runs (minutes each; tests/cli/test_bench_scripts.py)
test-bench: runtime
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,peers]"
	$(BIN)/python -m pytest tests -m bench

# ggml's Vulkan backend, patched, on Mesa's software driver (lavapipe): the system packages it needs
# (scripts/vulkan_sdk.sh), a Vulkan build of test-backend-ops and llama-perplexity (about 15 minutes on
# 2 cores, then cached), and tests/runtime/test_vulkan.py
test-vulkan: runtime
	sdk="$$(sh scripts/vulkan_sdk.sh)" && if [ -n "$$sdk" ]; then export VULKAN_SDK="$$sdk"; fi && \
	$(BIN)/python -m pytest tests -m vulkan

# the patch series applied one patch at a time to the pinned sdist: headers checked, then at every step ggml,
# llama, test-backend-ops and the series' own tests built and the MUL_MAT_ID tests run (scripts/check_patches.py;
# about 25 minutes on 2 cores the first time, the build folder build/check-patches kept for the next run)
check-patches: setup
	$(BIN)/python scripts/check_patches.py

# tests/fuzz with a long budget: mutated GGUFs, checkpoints, plans and statistics, drawn at random for about
# FUZZ_SECONDS (make test runs the same tests on a few fixed examples)
FUZZ_SECONDS ?= 600
fuzz: runtime
	MC_GGUF_FUZZ=fuzz MC_GGUF_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest tests/fuzz -m fuzz -s

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,serve,ray]"
	touch $@

runtime: setup
	$(BIN)/mc-gguf runtime build

clean:
	rm -rf $(VENV) build
