#!/usr/bin/env bash
# Prepare the files gpu_suite.sh needs on a GPU machine without network (run here, in the repo root):
# - .whl/: wheels for Python 3.12 / x86-64 of this project's dependencies that such a machine's
#   PyTorch image lacks (its image has torch, transformers, tiktoken, safetensors, numpy, ...);
# - .devcache/gpt2/: GPT-2's verified BPE files from this machine's cache.
# Both are git-ignored; a device call carries them: carry [".whl", ".devcache"].
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl .devcache
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	-d .whl omegaconf prompt_toolkit wcwidth fastapi starlette pydantic pydantic-core annotated-types \
	typing-inspection uvicorn datasets dill multiprocess shellingham
# omegaconf's parser runtime is published as a source package only: build its (pure Python) wheel.
"$PYTHON" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
"$PYTHON" -m reasoning_llama tokenize "Hello world" > /dev/null  # fills the GPT-2 cache
cp -r "${REASONING_LLAMA_CACHE:-$HOME/.cache/reasoning-llama}/gpt2" .devcache/
du -sh .whl .devcache
