#!/usr/bin/env bash
# The GPU check in one command: bench/gpu_check.py's four runs (gpt2_small MFU, bert_base MFU,
# 1-GPU FSDP smoke + export, nanoGPT's shakespeare_char recipe) and their table.
#
#   bash bench/gpu_check.sh                    # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --cpu-smoke        # everything shrunk, on a CPU (proves the script works)
#
# The device tool's H200 image lacks hydra-core, omegaconf (and its antlr4 runtime), datasets, dill and
# multiprocess. Prepare, once, from the repo root here (.whl/ and .gpu_data/ are git-ignored):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   python -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl  # PyPI has only its sdist
#   mkdir -p .gpu_data && cp ../shared/data/tinyshakespeare/input.txt .gpu_data/  # ../shared does not travel
# then run there with carry [".whl", ".gpu_data"] and the command
#   bash bench/gpu_check.sh --data .gpu_data/input.txt
# The wheels are installed into /tmp/site when hydra/omegaconf/datasets are missing; with $OUT set
# (the device tool), the table and the four runs' logs are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import hydra, omegaconf, datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
"$PY" bench/gpu_check.py --out logs/gpu_check "$@" || status=$?
if [ -n "${OUT:-}" ]; then
  latest=$(ls -d logs/gpu_check/2* | tail -1)
  cp "$latest"/table.md "$latest"/*.log "$OUT"/ 2>/dev/null || true
fi
exit $status
