"""The controller on local Ray: synced weights really are the learner's, frozen tensors travel once,
workers scale while running, async mode overlaps with bounded staleness, resume continues exactly."""
from __future__ import annotations

import json
import os

import pytest
import ray

from vlgrpo.cluster.controller import Trainer
from vlgrpo.rollout.hf_engine import tensor_checksum

from ..conftest import policy_weights, process_threads, small_run_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
_cfg = small_run_config


def _learner_checksums(trainer) -> dict[str, str]:
    """The learners' current policy as the product writes it (``save_pretrained``), read back."""
    return {n: tensor_checksum(t) for n, t in policy_weights(trainer).items()}


def _worker_checksums(trainer, names) -> list[dict[str, str]]:
    return ray.get([w.weights_checksum.remote(names) for w in trainer.fleet.workers])


def _version(trainer, i: int) -> int:
    return ray.get(trainer.fleet.workers[i].health.remote())["version"]


def _transports(trainer) -> list[str]:
    return [s.transport for s in trainer.fleet.slots]


@pytest.mark.parametrize("transport", ["auto", "broadcast"])
def test_sync_frozen_once_and_scaling(tmp_path, transport):
    """``auto`` on one node: every worker reads the learner's weights from shared memory, and the
    trainable ones live there (nothing is staged after the first sync); ``broadcast``: gloo."""
    trainer = Trainer(_cfg(tmp_path / "run", "trainer.total_steps=3", "learner.freeze_vision=true",
                           f"sync.transport={transport}"))
    try:
        trainer.setup()
        shm = transport == "auto"
        assert _transports(trainer) == ["shm" if shm else "broadcast"] * 2
        cores = min(os.cpu_count(), int(ray.cluster_resources()["CPU"]))  # sync: each phase has all the cores
        assert process_threads(trainer) == [cores] + [max(1, cores // 2)] * 2
        before = _learner_checksums(trainer)
        names = list(before)
        assert all(c == before for c in _worker_checksums(trainer, names)), "workers start from the learner's weights"

        m1 = trainer.train_step()
        after = _learner_checksums(trainer)
        changed = [n for n in names if after[n] != before[n]]
        frozen = [n for n in names if "visual" in n]
        assert changed and frozen and not set(changed) & set(frozen)
        for worker in _worker_checksums(trainer, names):
            assert worker == after, "rollout engine weights differ from the learner's after the sync"
        # only trainable tensors travel after the first (full) sync
        assert m1["sync/full"] == 0.0 and m1["sync/tensors"] == len(names) - len(frozen)
        assert m1["sync/version"] == 1 and _version(trainer, 0) == 1
        # shm: the optimizer updated the weights in place in shared memory, nothing was staged
        assert m1["sync/shm_workers"] == (2 if shm else 0) and m1["sync/staged_mb"] == 0

        trainer.fleet.scale(3, trainer.version)  # the new worker must receive everything, frozen tensors included
        assert len(trainer.fleet.slots) == 3
        assert all(c == after for c in _worker_checksums(trainer, names))
        assert _version(trainer, 2) == 1
        assert _transports(trainer) == ["shm" if shm else "broadcast"] * 3
        assert process_threads(trainer) == [cores] + [max(1, cores // 3)] * 3
        m2 = trainer.train_step()
        assert m2["rollout/weights_version"] == 1 and m2["sync/version"] == 2
        trainer.fleet.scale(1, trainer.version)
        m3 = trainer.train_step()
        assert len(trainer.fleet.slots) == 1 and m3["rollout/weights_version"] == 2
        assert process_threads(trainer) == [cores, cores]  # the one worker now has the node's cores while it generates
        assert all(c == _learner_checksums(trainer) for c in _worker_checksums(trainer, names))
    finally:
        trainer.shutdown()


def test_zero3_learners_sync_through_staged_shared_memory(tmp_path):
    """ZeRO-3 shards cannot live in the region: every sync gathers them on all ranks and rank 0
    stages them there; the workers still end up with exactly the learner's weights."""
    trainer = Trainer(_cfg(tmp_path / "z3", "trainer.total_steps=2", "learner.num_ranks=2", "learner.zero_stage=3"))
    try:
        trainer.setup()
        assert _transports(trainer) == ["shm", "shm"]
        before = _learner_checksums(trainer)
        m = trainer.train_step()
        after = _learner_checksums(trainer)
        assert after != before
        assert m["sync/shm_workers"] == 2 and m["sync/staged_mb"] == pytest.approx(m["sync/mb"])
        for worker in _worker_checksums(trainer, list(after)):
            assert worker == after
    finally:
        trainer.shutdown()


def test_async_one_step_off_policy(tmp_path):
    from vlgrpo.cluster.control import request_scale

    trainer = Trainer(_cfg(tmp_path / "async", "trainer.total_steps=4", "trainer.mode=async"))
    try:
        trainer.setup()
        request_scale(tmp_path / "async", 1)  # what `vlgrpo scale` writes; applied between steps
        history = trainer.run()
        assert len(trainer.fleet.slots) == 1
        assert not (tmp_path / "async" / "control" / "scale.json").exists()
    finally:
        trainer.shutdown()
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # step 1 uses the initial weights; afterwards each batch was generated one version behind
    assert [h["staleness/mean"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    assert [h["rollout/weights_version"] for h in history] == [0, 0, 1, 2]


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    t = Trainer(_cfg(full, "trainer.total_steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=5"))
    try:
        t.setup()
        t.run()
    finally:
        t.shutdown()
    # a second run resumes from the step-2 checkpoint of the first
    resumed_out = tmp_path / "resumed"
    t = Trainer(_cfg(resumed_out, "trainer.total_steps=4"), resume=str(full / "checkpoints" / "step_000002"))
    try:
        t.setup()
        assert t.step == 2 and t.version == 2
        history = t.run()
    finally:
        t.shutdown()
    assert [h["step"] for h in history] == [3, 4]
    reference = {r["step"]: r for r in _rows(full)}
    for h in history:
        ref = reference[h["step"]]
        for key in ("reward/mean", "loss/total", "response_length/mean"):
            assert h[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (h["step"], key)
