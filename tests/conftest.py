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


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for the tests of one module (shut down after it)."""
    import ray

    from vlgrpo.cluster.placement import init_ray

    init_ray(None, 4)
    yield
    ray.shutdown()


def small_run_config(out, *extra, prompts: int = 4, group_size: int = 4):
    """A few-second-per-step training config: tiny model, 2 transformers rollout workers, one plain
    torch learner, a dense reward (so every group has a learning signal from step 1)."""
    from vlgrpo.cluster.config import load_config

    return load_config(None, [
        f"trainer.output_dir={out}", "trainer.checkpoint_every=0", f"trainer.prompts_per_step={prompts}",
        f"rollout.group_size={group_size}", "rollout.max_tokens=6", "rollout.num_workers=2",
        "rollout.engine=transformers", "learner.num_ranks=1", "learner.zero_stage=0", "learner.lr=0.005",
        "metrics.tensorboard=false", "rollout.rewards=[{name: choice}, {name: vlgrpo.tests.plugins:char_variety}]",
        *extra,
    ])


def saved_weights(learners) -> dict:
    """The policy of a group of learner actors as the product saves it (``save_pretrained``, a
    collective), read back from its safetensors files: an independent view of their weights."""
    import tempfile

    import ray
    from safetensors.torch import load_file

    out = tempfile.mkdtemp(prefix="policy-")
    ray.get([a.save_pretrained.remote(out) for a in learners])
    weights = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


def policy_weights(trainer) -> dict:
    return saved_weights(trainer.fleet.learners)


def start_learners(cfg, model_cfg, world_size: int, num_cpus: float = 0.5) -> list:
    """A data-parallel group of ``cluster.actors.SyncedLearner`` actors on local Ray (rank order)."""
    import ray

    from vlgrpo.cluster.actors import SyncedLearner
    from vlgrpo.cluster.placement import get_free_port

    port = get_free_port()
    actors = [ray.remote(SyncedLearner).options(num_cpus=num_cpus).remote(cfg, model_cfg, r, world_size, "127.0.0.1", port)
              for r in range(world_size)]
    ray.get([a.ping.remote() for a in actors])
    return actors


def group_train_step(actors, batch) -> dict:
    """One collective ``train_step`` with ``batch`` split over the ranks; rank 0's metrics."""
    import ray

    return ray.get([a.train_step.remote(s) for a, s in zip(actors, batch.split(len(actors)))])[0]


def shared_copy(named):
    """``(name, tensor)`` pairs copied into a fresh ``SharedRegion``, as views of it (what a
    shared-memory sync hands an engine). Returns (region, [(name, view)])."""
    from vlgrpo.cluster.weight_sync import SharedRegion, packed_bytes, spec_of

    named = list(named)
    region = SharedRegion(packed_bytes([spec_of(n, t) for n, t in named]))
    views = []
    for n, t in named:
        v = region.view(region.alloc(t.numel() * t.element_size()), t.dtype, t.numel()).view(t.shape)
        v.copy_(t)
        views.append((n, v))
    return region, views
