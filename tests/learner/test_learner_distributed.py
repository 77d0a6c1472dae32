"""Learner groups as Ray actors under DeepSpeed ZeRO (gloo on CPU): data-parallel equivalence
with a single rank, frozen vision, weight export names, exact resume.

Each group start costs ~10-20 s on CPU (the first DeepSpeed init in a fresh cache also JIT-builds
its shared-memory comm op, ~45 s once)."""
from __future__ import annotations

import os

import pytest
import torch

from vlgrpo.learner.learner_actor import Learner, create_learner_group, group_call, group_train_step
from vlgrpo.learner.types import LearnerConfig

from .conftest import make_batch

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    yield
    ray.shutdown()


def _cfg(path, stage, **kw) -> LearnerConfig:
    opts = dict(model_path=path, module="qwen", zero_stage=stage, lr=1e-2, adam_eps=1e-2, warmup_steps=2,
                micro_batch_size=2, grad_clip=1.0, seed=0, num_threads=1, freeze_vision=True)
    opts.update(kw)
    return LearnerConfig(**opts)


def _global_batch(path, seed=0):
    """9 rows (3 prompts x 3): 2 ranks get 4 and 5 rows -> 2 and 3 micro-batches of 2."""
    local = Learner(_cfg(path, 0))  # only for module/processor (cheap, in-process, no DeepSpeed)
    return make_batch(local.module, local.processor, num_prompts=3, group_size=3, seed=seed), local


def _run_group(cfg, world, batches):
    actors = create_learner_group(cfg, world, num_cpus_per_actor=0.5)
    try:
        w0 = group_call(actors, "get_weights")[0]
        metrics = [group_train_step(actors, b) for b in batches]
        w1 = group_call(actors, "get_weights")[0]
        frozen = ray.get(actors[0].frozen_names.remote())
        return actors, w0, w1, metrics, frozen
    except Exception:
        for a in actors:
            ray.kill(a)
        raise


def _kill(actors):
    for a in actors:
        ray.kill(a)


def _assert_same(wa, wb, atol=2e-6, rtol=1e-5):
    assert set(wa) == set(wb)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], atol=atol, rtol=rtol, msg=n)


@pytest.mark.timeout(900)
def test_zero2_two_ranks_equal_one_rank_and_frozen_vision(ray_session, tiny_models, tmp_path):
    path = tiny_models["qwen2-vl"]
    batch, local = _global_batch(path)
    # reference: one in-process rank with plain torch (no DeepSpeed) on the full batch
    local.train_step(batch)
    w_local = local.get_weights()

    one, w0_1, w1_1, m1, frozen = _run_group(_cfg(path, 2), 1, [batch])
    _kill(one)
    two, w0_2, w1_2, m2, _ = _run_group(_cfg(path, 2), 2, [batch])
    try:
        _assert_same(w0_1, w0_2, atol=0, rtol=0)
        _assert_same(w1_1, w1_2)
        _assert_same(w1_2, w_local)
        assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], abs=1e-6)
        assert m1[0]["grad_norm"] == pytest.approx(m2[0]["grad_norm"], rel=1e-4)
        assert m2[0]["num_micro_batches"] == 3 and m2[0]["num_seqs"] == 9
        assert m1[0]["lr"] == m2[0]["lr"] == pytest.approx(0.5e-2)  # warmup: 1/2 of lr on step 1
        # frozen vision: bit-identical; the rest moved
        assert frozen and all(n.startswith("visual.") for n in frozen)
        for n in frozen:
            assert torch.equal(w0_2[n], w1_2[n]), n
        assert not torch.equal(w0_2["lm_head.weight"], w1_2["lm_head.weight"])

        # exact resume from a DeepSpeed checkpoint (2 ranks): save, step, load, same step again
        ck = str(tmp_path / "ds_ck")
        group_call(two, "save_checkpoint", ck)
        b2 = _global_batch(path, seed=1)[0]
        ma = group_train_step(two, b2)
        wa = group_call(two, "get_weights")[0]
        assert group_call(two, "load_checkpoint", ck) == [1, 1]
        mb = group_train_step(two, b2)
        wb = group_call(two, "get_weights")[0]
        assert ma["lr"] == mb["lr"] and ma["loss"] == mb["loss"]
        _assert_same(wa, wb, atol=0, rtol=0)
    finally:
        _kill(two)


@pytest.mark.timeout(900)
def test_zero3_two_ranks_equal_one_rank_with_reference_model(ray_session, tiny_models):
    path = tiny_models["qwen2-vl"]
    batch, _ = _global_batch(path)
    cfg = _cfg(path, 3, beta=0.05, num_iterations=2)
    one, w0_1, w1_1, m1, _ = _run_group(cfg, 1, [batch])
    _kill(one)
    two, w0_2, w1_2, m2, frozen = _run_group(cfg, 2, [batch])
    try:
        meta = ray.get(two[1].weights_meta.remote())
        from safetensors import safe_open

        with safe_open(f"{path}/model.safetensors", "pt") as f:
            assert [n for n, _, _ in meta] == list(w0_2) and set(w0_2) == set(f.keys())
            for n, shape, _ in meta:  # gathered ZeRO-3 weights before the step are the checkpoint's
                assert tuple(w0_2[n].shape) == shape
                assert torch.equal(w0_2[n], f.get_tensor(n)), n
        _assert_same(w1_1, w1_2)
        assert m2[0]["kl"] > 0 and m2[0]["global_step"] == 2
        assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], abs=1e-6)
        for n in frozen:
            assert torch.equal(w0_2[n], w1_2[n]), n
    finally:
        _kill(two)


@pytest.mark.timeout(600)
def test_plain_torch_two_ranks_equal_local(ray_session, tiny_models):
    """zero_stage 0 (no DeepSpeed): gradients all-reduced by hand over gloo."""
    path = tiny_models["qwen2-vl"]
    batch, local = _global_batch(path)
    local.train_step(batch)
    two, _, w1, m, _ = _run_group(_cfg(path, 0), 2, [batch])
    _kill(two)
    _assert_same(w1, local.get_weights())
    assert m[0]["num_seqs"] == 9
