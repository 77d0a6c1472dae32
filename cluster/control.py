"""Requests to a running job, passed through its output directory (which the driver and the user
both see, also under ``ray job submit`` with a shared filesystem).

    vlgrpo scale --output-dir runs/demo --rollout-workers 4

The driver checks between steps and removes the request once applied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .checkpoint import atomic_write_json


def _path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "control" / "scale.json"


def request_scale(output_dir: str | Path, rollout_workers: int) -> Path:
    if rollout_workers < 1:
        raise ValueError("--rollout-workers must be >= 1")
    if not (Path(output_dir) / "config.yaml").exists():
        raise FileNotFoundError(f"{output_dir} is not the output_dir of a vlgrpo run (no config.yaml)")
    path = _path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, {"rollout_workers": int(rollout_workers)})


def take_scale_request(output_dir: str | Path) -> Optional[int]:
    path = _path(output_dir)
    if not path.exists():
        return None
    try:
        n = int(json.loads(path.read_text())["rollout_workers"])
    finally:
        path.unlink(missing_ok=True)
    return n if n >= 1 else None
