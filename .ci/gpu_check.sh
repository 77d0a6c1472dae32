#!/usr/bin/env bash
# One command for a GPU machine: the GPU-only tests (CUDA IPC / NCCL sync, bf16 ZeRO learners on CUDA)
# and, where the real `vllm` is installed, the vLLM engine and sync tests (engine in a Ray actor,
# learner vs vLLM log-probs). Usage: .ci/gpu_check.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.cuda.device_count(), 'GPU(s):', torch.cuda.get_device_name(0))"
"$PY" -m pytest -q -rs tests/gpu tests/learner/test_zero_inprocess.py tests/learner/test_rank_resources.py
if "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pytest -q -rs tests/rollout/test_vllm_engine.py tests/cluster/test_vllm_sync.py
else
    echo "vllm is not installed for $PY: vLLM GPU tests skipped (pip install 'vlgrpo[vllm]')"
fi
