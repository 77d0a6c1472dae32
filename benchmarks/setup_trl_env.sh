#!/usr/bin/env bash
# Create the separate virtual environment in which the TRL side of `step_vs_trl` runs.
#
#     bash benchmarks/setup_trl_env.sh [VENV]          # default VENV: .venv-trl (repo root)
#
# TRL is never installed into the project's own environment. This one gets TRL, the project itself
# (editable, --no-deps: only its model factory, synthetic data and rewards are imported there) and
# just the dependencies those need, at the same torch / transformers versions as the main venv
# (read from MAIN_VENV, default .venv) so both sides run the same kernels.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-trl}"
MAIN_VENV="${MAIN_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
TRL_SPEC="${TRL_SPEC:-trl==1.16.0}"

ver() {  # version of a package in the main venv, if there is one
    if [ -x "$MAIN_VENV/bin/python" ]; then
        "$MAIN_VENV/bin/python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except Exception: pass" "$1"
    fi
}
pin() {  # "pkg==ver" when the main venv has it, else the fallback spec
    local v; v="$(ver "$1")"
    if [ -n "$v" ]; then echo "$1==$v"; else echo "$2"; fi
}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
"$VENV/bin/python" -m pip install -q \
    "$(pin torch 'torch>=2.4')" "$(pin torchvision 'torchvision>=0.19')" \
    "$(pin transformers 'transformers>=4.57')" "$(pin tokenizers 'tokenizers>=0.20')" \
    "$(pin accelerate 'accelerate>=1.10.1')" "$(pin safetensors 'safetensors>=0.4')" \
    "$(pin huggingface_hub 'huggingface_hub')" \
    "$(pin levenshtein 'levenshtein>=0.21')" pillow numpy pyyaml "$TRL_SPEC"
"$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
print(f"TRL env ready: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
from trl import GRPOConfig, GRPOTrainer  # noqa: F401  (fails here if TRL does not work with this transformers)
import vlgrpo.modules.tiny, vlgrpo.rollout.rewards, vlgrpo.rollout.data  # noqa: F401
EOF
