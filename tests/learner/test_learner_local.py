"""The Learner in-process (zero_stage 0: plain torch, one rank, no Ray, no DeepSpeed)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlgrpo.learner.rank import Learner, lr_lambda_factory
from vlgrpo.learner.types import LearnerConfig, TrainBatch
from vlgrpo.modules.loading import ModelConfig

from .conftest import FAMILY_MODULE, batch_logprobs, frozen_names, make_batch, make_learner, weights


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_update_direction_follows_advantage_sign(tiny_models, sign):
    learner = make_learner(tiny_models["qwen2-vl"], lr=1e-3, grad_clip=0.0)
    batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3,
                       advantages=torch.full((6,), sign))
    mask = batch.completion_mask.bool()
    before = (batch_logprobs(learner, batch) * mask).sum(1)
    metrics = learner.train_step(batch)
    after = (batch_logprobs(learner, batch) * mask).sum(1)
    delta = after - before
    assert metrics["optim/global_step"] == 1 and metrics["optim/grad_norm"] > 0
    # positive advantage raises every completion's log-prob, negative lowers it
    assert torch.all(delta * sign > 0), delta
    assert metrics["loss/total"] == pytest.approx(-sign, abs=1e-6)  # on-policy: loss = -mean(A)


def test_multimodal_keywords_change_the_loss_and_reach_vision_gradients(tiny_models):
    """The module's custom multimodal inputs (``pixel_values``, ``image_grid_thw``, ...) go from
    ``micro_batches`` through ``logprobs`` into the forward: the images change the completions'
    log-probs (hence the loss's gradient), the vision tower gets gradients through
    ``pixel_values`` and one ``train_step`` moves it."""
    learner = make_learner(tiny_models["qwen2-vl"], zero_stage=0, lr=1e-3, micro_batch_size=3)
    module = learner.module
    keys = module.get_vision_modules_keywords()

    def is_vision(name):
        return any(k in name for k in keys)

    vision = [n for n in learner.trainable_names() if is_vision(n)]
    assert vision and len(vision) < len(learner.trainable_names())
    batch = make_batch(module, learner.processor, num_prompts=2, group_size=3)
    # the same prompts and completions, every image replaced by a grey one of the same size (so
    # the same number of image tokens: the token inputs are identical)
    grey = replace(batch, images=[[Image.new("RGB", im.size, (128, 128, 128)) for im in ims]
                                  for ims in batch.images])
    micros, grey_micros = learner.micro_batches(batch), learner.micro_batches(grey)
    for mb, gmb in zip(micros, grey_micros):
        assert {"pixel_values", "image_grid_thw"} <= set(mb.inputs)
        for k, v in mb.inputs.items():
            same = torch.equal(v, gmb.inputs[k])
            assert same == (k != "pixel_values"), k  # only the pixels differ

    # (a) log-probs of the same completions: reproducible, and different under other images
    mask = batch.completion_mask.bool()
    lp = batch_logprobs(learner, batch)
    torch.testing.assert_close(batch_logprobs(learner, batch), lp, atol=1e-6, rtol=0)
    diff = (lp - batch_logprobs(learner, grey)).abs().masked_fill(~mask, 0)
    assert diff.sum() / mask.sum() > 1e-3, diff
    assert torch.all(diff.amax(dim=1) > 1e-4), diff  # every row sees its image

    # (c) gradients of the log-probs reach every vision parameter through pixel_values, and none
    # without them (the text-only path does not touch the vision tower)
    def vision_grads(mb):
        learner.model.zero_grad(set_to_none=True)
        out = learner.logprobs(mb)
        (out * mb.mask).sum().backward()
        grads = {n: None if p.grad is None else p.grad.clone()
                 for n, p in learner.model.named_parameters() if is_vision(n)}
        learner.model.zero_grad(set_to_none=True)
        return out.detach(), grads

    full_lp, grads = vision_grads(micros[0])
    assert len(grads) == len(vision)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    no_pixels = replace(micros[0], inputs={k: v for k, v in micros[0].inputs.items() if k != "pixel_values"})
    text_lp, text_grads = vision_grads(no_pixels)
    assert (full_lp - text_lp).abs().masked_fill(~micros[0].mask, 0).max() > 1e-3
    assert all(g is None or not g.any() for g in text_grads.values())

    # (b) one update moves every vision parameter
    w0 = weights(learner)
    m = learner.train_step(batch)
    assert m["optim/global_step"] == 1 and math.isfinite(m["optim/grad_norm"])
    w1 = weights(learner)
    unchanged = [n for n in w0 if is_vision(n) and torch.equal(w0[n], w1[n])]
    assert len([n for n in w0 if is_vision(n)]) == len(vision) and not unchanged, unchanged


def test_frozen_vision_is_bit_identical(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], freeze_vision=True, lr=1e-2)
    frozen = set(frozen_names(learner))
    assert not frozen & set(learner.trainable_names())
    assert frozen and all(n.startswith("visual.") for n in frozen)
    w0 = weights(learner)
    for seed in range(2):
        learner.train_step(make_batch(learner.module, learner.processor, seed=seed))
    w1 = weights(learner)
    for n in frozen:
        assert torch.equal(w0[n], w1[n]), n
    changed = [n for n in learner.trainable_names() if not torch.equal(w0[n], w1[n])]
    assert len(changed) > len(learner.trainable_names()) // 2


@pytest.mark.parametrize("family", list(FAMILY_MODULE))
def test_named_weights_match_checkpoint_state_dict(tiny_models, family):
    path = tiny_models[family]
    learner = make_learner(path, family)
    pairs = list(learner.named_weights())
    names = [n for n, _ in pairs]
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        ckpt_names = list(f.keys())
        assert len(names) == len(set(names))
        assert set(names) == set(ckpt_names)
        for n, t in pairs:  # before any update: the very tensors of the checkpoint
            assert torch.equal(t, f.get_tensor(n)), n
    assert set(learner.trainable_names()) | set(frozen_names(learner)) == set(names)


def test_save_pretrained_round_trip(tiny_models, tmp_path):
    learner = make_learner(tiny_models["internvl"], "internvl", lr=1e-2)
    learner.train_step(make_batch(learner.module, learner.processor))
    out = learner.save_pretrained(str(tmp_path / "hf"))
    w = weights(learner)
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert set(f.keys()) == set(w)
        for n in w:
            assert torch.equal(f.get_tensor(n), w[n]), n
    reloaded = make_learner(out, "internvl")
    for n, t in reloaded.named_weights():
        assert torch.equal(t, w[n])


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_size_does_not_change_the_update(tiny_models, loss_agg):
    """Gradient accumulation over 6 micro-batches of 1 row == one micro-batch of 6 rows.
    ``adam_eps`` is large so that Adam's first step is smooth in the gradient (with eps ~ 0 it is
    sign(g) and float noise on near-zero gradients would flip whole lr-sized steps)."""
    results = []
    for mbs in (1, 6):
        learner = make_learner(tiny_models["qwen2-vl"], micro_batch_size=mbs, lr=1e-2,
                               adam_eps=1e-2, loss_agg=loss_agg, max_completion_length=9)
        batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3)
        m = learner.train_step(batch)
        results.append((m, weights(learner)))
    (m1, w1), (m6, w6) = results
    assert m1["learner/num_micro_batches"] == 6 and m6["learner/num_micro_batches"] == 1
    assert m1["loss/total"] == pytest.approx(m6["loss/total"], abs=1e-6)
    assert m1["optim/grad_norm"] == pytest.approx(m6["optim/grad_norm"], rel=1e-5)
    for n in w1:
        torch.testing.assert_close(w1[n], w6[n], atol=1e-6, rtol=1e-5)


def test_num_iterations_reuses_old_logprobs_and_reports_kl(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], num_iterations=3, beta=0.05, lr=3e-2,
                           epsilon_low=0.01, epsilon_high=0.01)
    assert learner.ref_model is not None
    batch = make_batch(learner.module, learner.processor)
    m = learner.train_step(batch)
    # one train_step = num_iterations optimiser steps over the same batch
    assert m["optim/global_step"] == 3 and learner.global_step == 3
    # iterations 2 and 3 see the policy moved away from the old one
    assert m["policy/ratio_max"] > 1.0 or m["policy/ratio_min"] < 1.0
    assert m["policy/clip_frac"] > 0
    assert m["policy/kl"] > 0 and m["loss/kl"] > 0
    assert m["loss/total"] == pytest.approx(m["loss/pg"] + m["loss/kl"], abs=1e-9)
    assert math.isfinite(m["policy/entropy"]) and m["policy/entropy"] > 0
    assert m["faults/nonfinite_micro_batches"] == 0
    for k in ("loss/total", "loss/pg", "optim/grad_norm", "optim/grad_norm_mean", "optim/lr",
              "learner/tokens_per_s", "learner/num_seqs", "learner/num_tokens", "time/learner_s",
              "policy/clip_frac_low", "policy/clip_frac_high", "policy/ratio_mean"):
        assert k in m and math.isfinite(m[k]), k
    phases = [k for k in m if k.startswith("time/") and k != "time/learner_s"]
    assert phases and all(0 <= m[k] <= m["time/learner_s"] for k in phases), phases
    assert m["learner/num_seqs"] == batch.num_rows
    assert m["learner/num_tokens"] == int(batch.completion_mask.sum())


def test_given_old_and_sampling_logprobs_are_used(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], tis_cap=2.0)
    batch = make_batch(learner.module, learner.processor)
    current = batch_logprobs(learner, batch)
    batch.old_logprobs = current - 0.5  # the policy "moved up": ratio exp(0.5) on every token
    batch.sampling_logprobs = current + 0.1
    m = learner.train_step(batch)
    assert m["policy/ratio_mean"] == pytest.approx(math.exp(0.5), rel=1e-4)
    # the learner's current log-probs vs the sampler's (not vs old): the engine/learner mismatch
    assert m["policy/sampler_logprob_abs_diff"] == pytest.approx(0.1, rel=1e-4)


def test_checkpoint_resume_is_exact(tiny_models, tmp_path):
    kw = dict(lr=1e-2, warmup_steps=2, lr_schedule="cosine", total_steps=5)
    a = make_learner(tiny_models["qwen2-vl"], **kw)
    batches = [make_batch(a.module, a.processor, seed=s) for s in range(3)]
    a.train_step(batches[0])
    a.save_checkpoint(str(tmp_path / "ck"))
    ma = [a.train_step(b) for b in batches[1:]]
    b = make_learner(tiny_models["qwen2-vl"], **kw)
    assert b.load_checkpoint(str(tmp_path / "ck")) == 1
    mb = [b.train_step(x) for x in batches[1:]]
    assert [m["optim/lr"] for m in ma] == [m["optim/lr"] for m in mb] == [1e-2, lr_lambda_factory(a.cfg)(2) * 1e-2]
    wa, wb = weights(a), weights(b)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_lr_schedules():
    cfg = LearnerConfig(lr=1.0, warmup_steps=4, total_steps=14, lr_schedule="cosine",
                        min_lr_ratio=0.1)
    f = lr_lambda_factory(cfg)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert f(9) == pytest.approx(0.55)
    cfg.lr_schedule = "linear"
    f = lr_lambda_factory(cfg)
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    cfg.lr_schedule = "constant"
    assert lr_lambda_factory(cfg)(1000) == 1.0


def test_config_and_batch_validation():
    for bad in (dict(zero_stage=4), dict(loss_agg="bogus"), dict(lr_schedule="step"), dict(dtype="int8"),
                dict(micro_batch_size=0), dict(num_iterations=0)):
        with pytest.raises(ValueError):
            LearnerConfig(**bad)
    with pytest.raises(TypeError):  # the model lives in ModelConfig, not here
        LearnerConfig(model_path="x")
    assert LearnerConfig(loss_agg="dapo").loss_agg == "token_mean"
    with pytest.raises(ValueError, match="model.path"):  # rejected before loading anything
        Learner(LearnerConfig(zero_stage=0), ModelConfig(path=""))
    ids = torch.zeros(6, 3, dtype=torch.long)
    b = TrainBatch(["a", "b"], [[], []], ids, torch.ones_like(ids), torch.arange(6.0))
    assert b.row_prompt_index() == [0, 0, 0, 1, 1, 1]
    s0, s1 = b.split(2)
    assert s0.prompts_text == ["a"] and s1.prompts_text == ["b"]
    assert s0.global_num_seqs == 6 and s1.global_num_tokens == 18
    shards = b.split(4)
    assert [s.num_rows for s in shards] == [2, 1, 1, 2]
    assert [s.prompts_text for s in shards] == [["a"], ["a"], ["b"], ["b"]]
    cut = b.select(range(2, 4))  # rows that cut a group keep the right prompt per row
    assert cut.prompts_text == ["a", "b"] and cut.prompt_index == [0, 1]
    assert torch.equal(cut.advantages, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError):
        TrainBatch(["a"], [[]], ids, torch.ones_like(ids), torch.zeros(5))


def test_gradient_checkpointing_gives_the_same_update(tiny_models):
    out = []
    for gc in (False, True):
        learner = make_learner(tiny_models["qwen2-vl"], gradient_checkpointing=gc, lr=1e-2,
                               adam_eps=1e-2, micro_batch_size=3)
        enabled = any(getattr(mod, "gradient_checkpointing", False) for mod in learner.model.modules())
        assert enabled == gc
        m = learner.train_step(make_batch(learner.module, learner.processor))
        out.append((m, weights(learner)))
    assert out[0][0]["loss/total"] == pytest.approx(out[1][0]["loss/total"], abs=1e-6)
    for n, t in out[0][1].items():
        torch.testing.assert_close(t, out[1][1][n], atol=1e-6, rtol=1e-5)
