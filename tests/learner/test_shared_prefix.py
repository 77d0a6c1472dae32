"""The shared-prefix training forward (``learner.logprobs``): each distinct prompt of a micro-batch runs
once (vision tower included) with a KV cache and its completion rows attend to it. Against the
per-row forward, per family (Qwen's M-RoPE positions, InternVL's 1-D ones): log-probs and parameter
gradients in float32 on prompts of different lengths (left padding) and completions of different
lengths (right padding); a learner step with it on and off; and the per-row fallback."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from vlgrpo.learner.logprobs import build_micro_inputs, micro_cuts, per_token_logprobs
from vlgrpo.modules.qwen import QwenModule

from .conftest import make_batch, make_learner, weights

FAMILIES = {"qwen2-vl": "qwen", "qwen2.5-vl": "qwen", "qwen3-vl": "qwen", "internvl": "internvl"}


def _load(tiny_models, family):
    from vlgrpo.modules import get_module
    from vlgrpo.modules.loading import load_model_and_processor

    module = get_module(FAMILIES[family])
    model, processor = load_model_and_processor(tiny_models[family], module, torch.float32)
    return model.train(), module, processor


def _logprobs_and_grads(model, module, inputs, rows, batch, weight, **kw):
    """Log-probs, entropy and ``{param: grad}`` of ``sum(logprobs * weight)``."""
    model.zero_grad(set_to_none=True)
    lp, ent = per_token_logprobs(model, module, inputs, batch.completion_ids, batch.completion_mask, rows=rows,
                                 return_entropy=True, **kw)
    (lp * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return lp.detach(), ent, grads


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("temperature, suppress", [(1.0, False), (0.7, True)])
def test_shared_prefix_equals_per_row_logprobs_and_grads(tiny_models, family, temperature, suppress):
    model, module, processor = _load(tiny_models, family)
    assert module.supports_shared_prefix
    batch = make_batch(module, processor, num_prompts=3, group_size=3, max_len=7, seed=1)
    pidx = batch.row_prompt_index()
    per_row, none = build_micro_inputs(module, processor, batch.prompts_text, batch.images, pidx, shared=False)
    shared, rows = build_micro_inputs(module, processor, batch.prompts_text, batch.images, pidx)
    assert none is None and rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert shared["input_ids"].shape == (3, per_row["input_ids"].shape[1])  # each prompt processed once
    assert (shared["attention_mask"] == 0).any(), "prompts should need left padding"
    assert len(set(batch.completion_mask.sum(1).tolist())) > 1, "completions should need right padding"

    kw = dict(temperature=temperature, suppress_ids=module.vision_token_ids(processor) if suppress else None)
    weight = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    lp0, ent0, g0 = _logprobs_and_grads(model, module, per_row, None, batch, weight, **kw)
    lp1, ent1, g1 = _logprobs_and_grads(model, module, shared, rows, batch, weight, **kw)
    mask = batch.completion_mask.bool()
    assert torch.all(lp1[~mask] == 0) and torch.all(lp1[mask] < 0)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent1, ent0, atol=1e-5, rtol=0)
    assert set(g1) == set(g0) == {n for n, p in model.named_parameters() if p.requires_grad}  # vision included
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    print(f"{family} T={temperature}: max |dlogp| {(lp1 - lp0).abs().max():.2e}, "
          f"max |dgrad| {max((g1[n] - g0[n]).abs().max() for n in g0):.2e}")


def test_one_token_completions_and_partial_groups(tiny_models):
    """Completions of one token (the prompt forward alone scores them) and rows out of group order."""
    model, module, processor = _load(tiny_models, "qwen2-vl")
    batch = make_batch(module, processor, num_prompts=2, group_size=2, max_len=3)
    batch = replace(batch, completion_ids=batch.completion_ids[:, :1], completion_mask=batch.completion_mask[:, :1])
    pidx = [1, 0, 1, 1]
    per_row, _ = build_micro_inputs(module, processor, batch.prompts_text, batch.images, pidx, shared=False)
    shared, rows = build_micro_inputs(module, processor, batch.prompts_text, batch.images, pidx)
    assert rows.tolist() == [0, 1, 0, 0]
    weight = torch.ones(batch.completion_ids.shape)
    lp0, _, g0 = _logprobs_and_grads(model, module, per_row, None, batch, weight)
    lp1, _, g1 = _logprobs_and_grads(model, module, shared, rows, batch, weight)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen2-vl", "internvl"])
def test_train_step_same_with_shared_prefix_on_and_off(tiny_models, family):
    """micro_batch_size 2 with groups of 3: micro-batches hold part of a group; reference model (β > 0)
    and old log-probs (μ = 2) take the same path. ``adam_eps`` 1: the update is ~linear in the gradient
    (Adam would blow float noise of ~0 gradients up to ±lr)."""
    out = {}
    for shared in (True, False):
        learner = make_learner(tiny_models[family], family, shared_prefix=shared,
                               micro_batch_size=2, beta=0.04, num_iterations=2, lr=1e-2, adam_eps=1.0)
        batch = make_batch(learner.module, learner.processor, num_prompts=3, group_size=3, seed=2)
        micros = learner.micro_batches(batch)
        assert [None if mb.rows is None else mb.rows.tolist() for mb in micros] == (
            [[0, 0], [0, 1], [0, 0], [0, 0], [0]] if shared else [None] * 5)
        assert [mb.inputs["input_ids"].shape[0] for mb in micros] == ([1, 2, 1, 1, 1] if shared else [2, 2, 2, 2, 1])
        out[shared] = learner.train_step(batch), weights(learner)
    (m1, w1), (m0, w0) = out[True], out[False]
    for key in ("loss/total", "loss/kl", "policy/kl", "policy/entropy", "optim/grad_norm"):
        assert m1[key] == pytest.approx(m0[key], abs=1e-5, rel=1e-5), key
    assert any(not torch.equal(w0[n], w) for n, w in make_learner(tiny_models[family], family).named_weights())
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-6, rtol=1e-5, msg=name)
    print(f"{family}: max |dw| {max((w1[n] - w0[n]).abs().max() for n in w0):.2e}")


@pytest.mark.parametrize("groups,size", [([3, 3, 3], 4), ([8, 8, 8], 20), ([2, 3, 1, 4], 5), ([3, 3, 3], 2), ([5], 5)])
def test_micro_batches_cut_whole_groups_where_they_fit(groups, size):
    """Each prompt's rows land in one micro-batch when a group fits (else fixed-size cuts, as before): the rows
    are covered in order, no micro-batch exceeds ``size``, and the learner runs each prompt once a step."""
    pidx = [p for p, g in enumerate(groups) for _ in range(g)]
    cuts = micro_cuts(pidx, size)
    assert [r for s, e in cuts for r in range(s, e)] == list(range(len(pidx)))
    assert all(0 < e - s <= size for s, e in cuts)
    prompt_runs = sum(len(set(pidx[s:e])) for s, e in cuts)
    if max(groups) <= size:
        assert prompt_runs == len(groups)
    else:
        assert cuts == [(s, min(s + size, len(pidx))) for s in range(0, len(pidx), size)]
    if (groups, size) == ([3, 3, 3], 4):
        assert cuts == [(0, 3), (3, 6), (6, 9)]  # fixed cuts of 4 would run prompts 0 and 1 twice (5 runs)


def test_a_module_without_support_takes_the_per_row_path(tiny_models):
    class PerRowQwen(QwenModule):
        supports_shared_prefix = False

    learner = make_learner(tiny_models["qwen2-vl"], micro_batch_size=6, beta=0)
    batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3)
    [mb] = learner.micro_batches(batch)
    assert mb.rows.tolist() == [0, 0, 0, 1, 1, 1] and mb.inputs["input_ids"].shape[0] == 2
    learner.module = PerRowQwen()
    [mb] = learner.micro_batches(batch)
    assert mb.rows is None and mb.inputs["input_ids"].shape[0] == 6
    assert math.isfinite(learner.train_step(batch)["loss/total"])
    inputs, _ = build_micro_inputs(QwenModule(), learner.processor, batch.prompts_text, batch.images, [0, 1])
    with pytest.raises(ValueError, match="does not support the shared-prefix"):  # never silently per prompt
        per_token_logprobs(learner.model, PerRowQwen(), inputs, batch.completion_ids[:2], batch.completion_mask[:2],
                           rows=torch.tensor([0, 1]))


def test_gradient_checkpointing_takes_the_per_row_path(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], gradient_checkpointing=True, beta=0)
    batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=2)
    assert all(mb.rows is None for mb in learner.micro_batches(batch))
    inputs, rows = build_micro_inputs(learner.module, learner.processor, batch.prompts_text, batch.images,
                                      batch.row_prompt_index())
    with pytest.raises(RuntimeError, match="no KV cache"):  # the cache dropped by checkpointing is caught
        per_token_logprobs(learner.model, learner.module, inputs, batch.completion_ids, batch.completion_mask,
                           rows=rows)


def test_zero3_train_step_same_with_shared_prefix_on_and_off(tiny_models, port):
    """Under DeepSpeed ZeRO-3 (parameters gathered per forward: two forwards before one backward)."""
    pytest.importorskip("deepspeed")
    from vlgrpo.learner.rank import Learner

    from .conftest import learner_configs

    out = {}
    for shared in (True, False):
        learner = Learner(*learner_configs(tiny_models["qwen2-vl"], "qwen2-vl", zero_stage=3, shared_prefix=shared,
                                           micro_batch_size=4, lr=1e-2, adam_eps=1.0, beta=0.0, num_threads=2),
                          master_port=port)
        batch = make_batch(learner.module, learner.processor, num_prompts=2, group_size=3, seed=3)
        out[shared] = learner.train_step(batch), weights(learner)
    (m1, w1), (m0, w0) = out[True], out[False]
    assert m1["loss/total"] == pytest.approx(m0["loss/total"], abs=1e-6)
    for name in w0:
        torch.testing.assert_close(w1[name], w0[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_shared_prefix_with_videos(tiny_models, family):
    """Prompts with a video (Qwen's M-RoPE over time: ``video_grid_thw``, and Qwen2.5-VL's
    ``second_per_grid_ts`` from the frame rate), with an image before it, or an image alone."""
    from PIL import Image

    from vlgrpo.modules import Video

    model, module, processor = _load(tiny_models, family)
    batch = make_batch(module, processor, num_prompts=3, group_size=2, max_len=5, seed=4)
    frames = [Image.new("RGB", (56, 56), (40 * k, 0, 255 - 40 * k)) for k in range(6)]
    visuals = [[Video(frames[:4], fps=2)], [batch.images[1][0], Video(frames, fps=1)], batch.images[2]]
    kinds = [["video"], ["image", "video"], ["image"]]
    texts = module.prepare_prompt(processor, [{"prompt": [{"role": "user", "content": [
        *({"type": k} for k in ks), {"type": "text", "text": "Which way?"}]}]} for ks in kinds])
    batch = replace(batch, prompts_text=texts, images=visuals)
    pidx = batch.row_prompt_index()
    per_row, _ = build_micro_inputs(module, processor, texts, visuals, pidx, shared=False)
    shared, rows = build_micro_inputs(module, processor, texts, visuals, pidx)
    assert shared["video_grid_thw"].tolist() == [[2, 4, 4], [3, 4, 4]]  # frames / temporal patch 2, 56 px / 14
    if family == "qwen2.5-vl":  # seconds per temporal patch: 2 frames / fps
        assert shared["second_per_grid_ts"].tolist() == [1.0, 2.0]
    weight = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    lp0, _, g0 = _logprobs_and_grads(model, module, per_row, None, batch, weight)
    lp1, _, g1 = _logprobs_and_grads(model, module, shared, rows, batch, weight)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)
    # the video counts: other frames, other log-probs
    other = [[Video(frames[2:6], fps=2)], *visuals[1:]]
    lp2 = per_token_logprobs(model, module, build_micro_inputs(module, processor, texts, other, pidx)[0],
                             batch.completion_ids, batch.completion_mask, rows=rows).detach()
    assert (lp2[:2] - lp1[:2]).abs().max() > 1e-4 and torch.equal(lp2[2:], lp1[2:])
