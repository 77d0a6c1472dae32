"""Learner groups as Ray actors under DeepSpeed ZeRO (gloo on CPU): data-parallel equivalence
with a single rank, frozen vision, weight export names, exact resume.

Each group start costs ~10-20 s on CPU (the first DeepSpeed init in a fresh cache also JIT-builds
its shared-memory comm op, ~45 s once)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from vlgrpo.learner.rank import Learner

from ..conftest import group_call, group_train_step, group_weights, kill_group, start_learner_group
from .conftest import learner_configs, make_batch, weights

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


def _cfg(path, stage, **kw):
    """(LearnerConfig, ModelConfig) of the group tests."""
    opts = dict(zero_stage=stage, lr=1e-2, adam_eps=1e-2, warmup_steps=2, micro_batch_size=2, grad_clip=1.0,
                seed=0, num_threads=1, freeze_vision=True)
    opts.update(kw)
    return learner_configs(path, "qwen2-vl", **opts)


def _global_batch(path, seed=0):
    """9 rows (3 prompts x 3): 2 ranks get 4 and 5 rows -> 2 and 3 micro-batches of 2."""
    local = Learner(*_cfg(path, 0))  # in-process, plain torch, no DeepSpeed
    return make_batch(local.module, local.processor, num_prompts=3, group_size=3, seed=seed), local


def _run_group(cfgs, world, batches):
    actors = start_learner_group(*cfgs, world)
    try:
        w0 = group_weights(actors)
        metrics = [group_train_step(actors, b) for b in batches]
        w1 = group_weights(actors)

        def frozen_names(lr):  # a nested function travels into the actor by value
            return [lr._ck(n) for n, p in lr.model.named_parameters() if not p.requires_grad]

        frozen = ray.get(actors[0].__ray_call__.remote(frozen_names))
        return actors, w0, w1, metrics, frozen
    except Exception:
        kill_group(actors)
        raise


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
    w_local = weights(local)

    one, w0_1, w1_1, m1, frozen = _run_group(_cfg(path, 2), 1, [batch])
    kill_group(one)
    two, w0_2, w1_2, m2, _ = _run_group(_cfg(path, 2), 2, [batch])
    try:
        _assert_same(w0_1, w0_2, atol=0, rtol=0)
        _assert_same(w1_1, w1_2)
        _assert_same(w1_2, w_local)
        assert m1[0]["loss/total"] == pytest.approx(m2[0]["loss/total"], abs=1e-6)
        assert m1[0]["optim/grad_norm"] == pytest.approx(m2[0]["optim/grad_norm"], rel=1e-4)
        assert m2[0]["learner/num_micro_batches"] == 3 and m2[0]["learner/num_seqs"] == 9
        # warmup: 1/2 of lr on step 1
        assert m1[0]["optim/lr"] == m2[0]["optim/lr"] == pytest.approx(0.5e-2)
        # frozen vision: bit-identical; the rest moved
        assert frozen and all(n.startswith("visual.") for n in frozen)
        for n in frozen:
            assert torch.equal(w0_2[n], w1_2[n]), n
        assert not torch.equal(w0_2["lm_head.weight"], w1_2["lm_head.weight"])

        # exact resume from a DeepSpeed checkpoint (2 ranks): save, step, load, same step again
        ck = str(tmp_path / "ds_ck")
        group_call(two, "save_checkpoint", ck)
        b2 = make_batch(local.module, local.processor, num_prompts=3, group_size=3, seed=1)
        ma = group_train_step(two, b2)
        wa = group_weights(two)
        assert group_call(two, "load_checkpoint", ck) == [1, 1]
        mb = group_train_step(two, b2)
        wb = group_weights(two)
        assert ma["optim/lr"] == mb["optim/lr"] and ma["loss/total"] == mb["loss/total"]
        assert ma["optim/global_step"] == mb["optim/global_step"] == 2
        assert not torch.equal(wa["lm_head.weight"], w1_2["lm_head.weight"])  # the second step moved it
        _assert_same(wa, wb, atol=0, rtol=0)
    finally:
        kill_group(two)


@pytest.mark.timeout(900)
def test_zero3_two_ranks_equal_one_rank_with_reference_model(ray_session, tiny_models):
    path = tiny_models["qwen2-vl"]
    batch, _ = _global_batch(path)
    cfgs = _cfg(path, 3, beta=0.05, num_iterations=2)
    one, w0_1, w1_1, m1, _ = _run_group(cfgs, 1, [batch])
    kill_group(one)
    two, w0_2, w1_2, m2, frozen = _run_group(cfgs, 2, [batch])
    try:
        meta = ray.get(two[1].weights_meta.remote())
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            assert [n for n, _, _ in meta] == list(w0_2) and set(w0_2) == set(f.keys())
            for n, shape, _ in meta:  # gathered ZeRO-3 weights before the step are the checkpoint's
                assert tuple(w0_2[n].shape) == shape
                assert torch.equal(w0_2[n], f.get_tensor(n)), n
        trainable_meta = ray.get(two[1].weights_meta.remote(trainable_only=True))
        assert {n for n, _, _ in trainable_meta} == set(w0_2) - set(frozen)
        _assert_same(w1_1, w1_2)
        assert m2[0]["policy/kl"] > 0 and m2[0]["optim/global_step"] == 2
        assert m1[0]["loss/total"] == pytest.approx(m2[0]["loss/total"], abs=1e-6)
        assert frozen
        for n in frozen:
            assert torch.equal(w0_2[n], w1_2[n]), n
        assert not torch.equal(w0_2["lm_head.weight"], w1_2["lm_head.weight"])
    finally:
        kill_group(two)


@pytest.mark.timeout(600)
def test_plain_torch_two_ranks_equal_local(ray_session, tiny_models):
    """zero_stage 0 (no DeepSpeed): gradients all-reduced by hand over gloo."""
    path = tiny_models["qwen2-vl"]
    batch, local = _global_batch(path)
    w0 = weights(local)
    local.train_step(batch)
    two, _, w1, m, _ = _run_group(_cfg(path, 0), 2, [batch])
    kill_group(two)
    _assert_same(w1, weights(local))
    assert not torch.equal(w0["lm_head.weight"], w1["lm_head.weight"])
    assert m[0]["learner/num_seqs"] == 9
