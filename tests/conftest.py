"""Shared fixtures: tiny models built once per test session from config (no model hub)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

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
        "rollout.engine=transformers", "learner.num_ranks=1", "learner.zero_stage=0", "learner.lr=0.005", "learner.beta=0",
        "model.tiny_warmup_steps=0", "trainer.val_every=0", "metrics.samples_every=0",
        "metrics.tensorboard=false", "rollout.rewards=[{name: accuracy}, {name: vlgrpo.tests.plugins:char_variety}]",
        *extra,
    ])


def saved_weights(learners) -> dict:
    """The policy of a group of learner actors as the product saves it (``save_pretrained``, a
    collective), read back from its safetensors files: an independent view of their weights."""
    import tempfile

    import ray
    from safetensors.torch import load_file

    weights = {}
    with tempfile.TemporaryDirectory(prefix="policy-") as out:
        ray.get([a.save_pretrained.remote(out) for a in learners])
        for f in sorted(Path(out).glob("*.safetensors")):
            weights.update(load_file(f))
    return weights


def policy_weights(trainer) -> dict:
    return saved_weights(trainer.fleet.learners)


def process_threads(trainer) -> list[int]:
    """torch threads as each learner and worker process reports them."""
    import ray
    import torch

    return ray.get([a.__ray_call__.remote(lambda self: torch.get_num_threads())
                    for a in trainer.fleet.learners + trainer.fleet.workers])


# -- a Ray learner group --------------------------------------------------------------------------
def start_learner_group(cfg, model_cfg, world_size: int, num_cpus: float = 0.5, actor_class=None) -> list:
    """``world_size`` ``ray.remote(actor_class)`` actors (default: the plain ``Learner``; the cluster
    runs ``cluster.actors.SyncedLearner``) forming one data-parallel group (rendezvous on 127.0.0.1
    at a free port), returned once every rank is initialised. Needs a running Ray (the
    ``ray_session`` fixture); kill them with ``kill_group``."""
    import ray

    from vlgrpo.cluster.placement import get_free_port
    from vlgrpo.learner.rank import Learner

    cls = ray.remote(actor_class or Learner)
    port = get_free_port()
    actors = [cls.options(num_cpus=num_cpus, num_gpus=0).remote(cfg, model_cfg, r, world_size, "127.0.0.1", port)
              for r in range(world_size)]
    try:
        pings = ray.get([a.ping.remote() for a in actors])
    except Exception:
        kill_group(actors)
        raise
    assert [p["rank"] for p in pings] == list(range(world_size))
    return actors


def kill_group(actors: Sequence[Any]) -> None:
    import ray

    for a in actors:
        ray.kill(a)


def group_call(actors: Sequence[Any], method: str, *args, **kwargs) -> list:
    """Call ``method`` on every rank at once (collective methods) and wait for all results."""
    import ray

    return ray.get([getattr(a, method).remote(*args, **kwargs) for a in actors])


def group_train_step(actors: Sequence[Any], batch) -> dict[str, float]:
    """``batch`` split over the group (``TrainBatch.split``), one ``train_step`` on every rank;
    returns rank 0's metrics after checking every rank reported the same (timings aside)."""
    import ray

    shards = batch.split(len(actors))
    results = ray.get([a.train_step.remote(s) for a, s in zip(actors, shards)])
    stable = [{k: v for k, v in m.items() if not (k.startswith("time/") or k == "learner/tokens_per_s")}
              for m in results]
    for r, m in enumerate(stable[1:], 1):
        assert m.keys() == stable[0].keys(), r
        for k in m:
            assert m[k] == pytest.approx(stable[0][k], rel=1e-6, abs=1e-9, nan_ok=True), (r, k)
    return results[0]


def group_weights(actors: Sequence[Any]) -> dict:
    """Rank 0's full weights: ``named_weights`` (collective) iterated to the end on every rank at
    once, inside each actor (Ray's ``__ray_call__``; a nested function travels by value)."""
    import ray

    def pull(learner):
        return [(n, t.detach().to("cpu", copy=True)) for n, t in learner.named_weights()]

    per_rank = ray.get([a.__ray_call__.remote(pull) for a in actors])
    assert all(not p for p in per_rank[1:]), "only rank 0 yields weights"
    out = dict(per_rank[0])
    assert len(out) == len(per_rank[0]), "duplicate names"
    return out


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
