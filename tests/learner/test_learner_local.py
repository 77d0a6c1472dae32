"""The Learner in-process (zero_stage 0: plain torch, one rank, no Ray, no DeepSpeed)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from vlgrpo.learner.learner_actor import Learner, lr_lambda_factory
from vlgrpo.learner.types import LearnerConfig, TrainBatch

from .conftest import FAMILY_MODULE, make_batch


def make_learner(path, family="qwen2-vl", **kw) -> Learner:
    opts = dict(model_path=path, module=FAMILY_MODULE[family], zero_stage=0, lr=1e-3,
                micro_batch_size=4, seed=0, num_threads=2)
    opts.update(kw)
    return Learner(LearnerConfig(**opts))


def weights(learner) -> dict[str, torch.Tensor]:
    return learner.get_weights()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_update_direction_follows_advantage_sign(tiny_models, sign):
    learner = make_learner(tiny_models["qwen2-vl"], lr=1e-3, grad_clip=0.0)
    batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3,
                       advantages=torch.full((6,), sign))
    mask = batch.completion_mask.bool()
    before = (learner.compute_logprobs(batch) * mask).sum(1)
    metrics = learner.train_step(batch)
    after = (learner.compute_logprobs(batch) * mask).sum(1)
    delta = after - before
    assert metrics["global_step"] == 1 and metrics["grad_norm"] > 0
    # positive advantage raises every completion's log-prob, negative lowers it
    assert torch.all(delta * sign > 0), delta
    assert metrics["loss"] == pytest.approx(-sign, abs=1e-6)  # on-policy: loss = -mean(A)


def test_frozen_vision_is_bit_identical(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], freeze_vision=True, lr=1e-2)
    frozen = set(learner.frozen_names())
    assert frozen and all(n.startswith("visual.") for n in frozen)
    assert not frozen & set(learner.trainable_names())
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
    assert set(learner.trainable_names()) | set(learner.frozen_names()) == set(names)


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
    assert m1["num_micro_batches"] == 6 and m6["num_micro_batches"] == 1
    assert m1["loss"] == pytest.approx(m6["loss"], abs=1e-6)
    assert m1["grad_norm"] == pytest.approx(m6["grad_norm"], rel=1e-5)
    for n in w1:
        torch.testing.assert_close(w1[n], w6[n], atol=1e-6, rtol=1e-5)


def test_num_iterations_reuses_old_logprobs_and_reports_kl(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], num_iterations=3, beta=0.05, lr=3e-2,
                           epsilon_low=0.01, epsilon_high=0.01)
    assert learner.ref_model is not None
    batch = make_batch(learner.module, learner.processor)
    m = learner.train_step(batch)
    assert m["global_step"] == 3 and m["num_iterations"] == 3
    # iterations 2 and 3 see the policy moved away from the old one
    assert m["ratio_max"] > 1.0 or m["ratio_min"] < 1.0
    assert m["clip_frac"] > 0
    assert m["kl"] > 0 and m["kl_loss"] > 0
    assert math.isfinite(m["entropy"]) and m["entropy"] > 0
    for k in ("loss", "pg_loss", "grad_norm", "lr", "tokens_per_s", "time_s", "clip_frac_low",
              "clip_frac_high", "ratio_mean"):
        assert k in m and math.isfinite(m[k]), k


def test_given_old_and_sampling_logprobs_are_used(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], tis_cap=2.0)
    batch = make_batch(learner.module, learner.processor)
    current = learner.compute_logprobs(batch)
    batch.old_logprobs = current - 0.5  # the policy "moved up": ratio exp(0.5) on every token
    batch.sampling_logprobs = current + 0.1
    m = learner.train_step(batch)
    assert m["ratio_mean"] == pytest.approx(math.exp(0.5), rel=1e-4)
    # the learner's current log-probs vs the sampler's (not vs old): the engine/learner mismatch
    assert m["sampler_logprob_abs_diff"] == pytest.approx(0.1, rel=1e-4)


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
    assert [m["lr"] for m in ma] == [m["lr"] for m in mb] == [1e-2, lr_lambda_factory(a.cfg)(2) * 1e-2]
    wa, wb = weights(a), weights(b)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


def test_lr_schedules():
    cfg = LearnerConfig(model_path="x", lr=1.0, warmup_steps=4, total_steps=14, lr_schedule="cosine",
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
    with pytest.raises(ValueError):
        LearnerConfig(model_path="x", zero_stage=4)
    with pytest.raises(ValueError):
        LearnerConfig(model_path="x", loss_agg="bogus")
    with pytest.raises(ValueError):
        LearnerConfig.from_dict({"model_path": "x", "nope": 1})
    assert LearnerConfig(model_path="x", loss_agg="dapo").loss_agg == "token_mean"
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
    assert out[0][0]["loss"] == pytest.approx(out[1][0]["loss"], abs=1e-6)
    for n, t in out[0][1].items():
        torch.testing.assert_close(t, out[1][1][n], atol=1e-6, rtol=1e-5)
