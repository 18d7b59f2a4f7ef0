#!/usr/bin/env bash
# GPU path check for one GPU and no internet, under 10 minutes: see bench/gpu_check.py.
#   bash bench/gpu_check.sh            (needs `pip install -e .[gpu]` done beforehand)
# The stages' caps sum to 530 s (gpu_check.BUDGET_S); `timeout` is only the backstop, and its SIGTERM still
# gets the JSON of the stages that ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AIGD_HOME=${AIGD_HOME:-$PWD/.aigd}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import unsloth, bitsandbytes; print('unsloth', unsloth.__version__, 'bitsandbytes', bitsandbytes.__version__)" \
  || echo "unsloth/bitsandbytes missing: install the gpu extra (pip install -e '.[gpu]') first"
exec timeout 580 "$PY" bench/gpu_check.py --json "$@"
