"""Shared fixtures: tiny models built once per test session from config (no model hub)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """``factory(family, size="tiny", seed=0) -> Path`` building each model once per session."""
    from vlgrpo.modules.tiny import build_tiny_model

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def factory(family: str, size: str = "tiny", seed: int = 0) -> Path:
        key = (family, size, seed)
        if key not in cache:
            cache[key] = build_tiny_model(family, root / f"{family}-{size}-{seed}", seed=seed, size=size)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def qwen2_vl_path(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2-vl")
