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
# The versions this machine's environment runs (pydantic, for one, refuses a pydantic-core other
# than the one it was released with), so the GPU machine imports what the test suite tested.
names="omegaconf prompt_toolkit wcwidth fastapi starlette pydantic pydantic-core annotated-types
	typing-inspection annotated-doc uvicorn datasets dill multiprocess shellingham typer click"
pins=$("$PYTHON" -c 'import sys
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $names)
# shellcheck disable=SC2086  # one argument per pin
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	-d .whl $pins
"$PYTHON" -m reasoning_llama tokenize "Hello world" > /dev/null  # fills the GPT-2 cache
cp -r "${REASONING_LLAMA_CACHE:-$HOME/.cache/reasoning-llama}/gpt2" .devcache/
du -sh .whl .devcache
