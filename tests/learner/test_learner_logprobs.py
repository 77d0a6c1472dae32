"""per_token_logprobs: batched (left-padded prompts, right-padded completions, logits_to_keep)
against a row-by-row computation without any padding and with the full logits."""
from __future__ import annotations

import pytest
import torch

from vlgrpo.learner.logprobs import build_rows_inputs, per_token_logprobs

from .conftest import FAMILY_MODULE, make_batch


@pytest.mark.parametrize("family", list(FAMILY_MODULE))
def test_batched_logprobs_match_unpadded_rows(tiny_models, family):
    from vlgrpo.modules import get_module
    from vlgrpo.modules.loading import load_model_and_processor

    module = get_module(FAMILY_MODULE[family])
    model, processor = load_model_and_processor(tiny_models[family], module)
    batch = make_batch(module, processor, num_prompts=3, group_size=2, max_len=6)
    pidx = batch.row_prompt_index()
    inputs = build_rows_inputs(module, processor, batch.prompts_text, batch.images, pidx)
    video_keys = {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}  # images only here
    assert set(inputs) == {"input_ids", "attention_mask", *module.get_custom_multimodal_keywords()} - video_keys
    assert (inputs["attention_mask"] == 0).any(), "prompts should need left padding"

    with torch.no_grad():
        lp, ent = per_token_logprobs(model, module, inputs, batch.completion_ids,
                                     batch.completion_mask, return_entropy=True)
    assert lp.shape == batch.completion_ids.shape and lp.dtype == torch.float32
    mask = batch.completion_mask.bool()
    assert torch.all(lp[~mask] == 0) and torch.all(ent[~mask] == 0)
    assert torch.all(lp[mask] < 0) and torch.all(ent[mask] > 0)

    for i in range(batch.num_rows):
        one = module.prepare_model_inputs(processor, [batch.prompts_text[pidx[i]]], [batch.images[pidx[i]]])
        p = one["input_ids"].shape[1]
        n_tok = int(mask[i].sum())
        comp = batch.completion_ids[i:i + 1, :n_tok]
        full = module.append_completions(one, comp, torch.ones_like(comp))
        with torch.no_grad():
            logits = model(**full, use_cache=False).logits[0].float()  # all positions
        ref_lp = torch.log_softmax(logits, -1)
        for t in range(n_tok):
            expected = ref_lp[p - 1 + t, comp[0, t]]
            assert lp[i, t].item() == pytest.approx(expected.item(), abs=2e-5), (i, t)
            probs = ref_lp[p - 1 + t].exp()
            expected_ent = -(probs * ref_lp[p - 1 + t]).sum()
            assert ent[i, t].item() == pytest.approx(expected_ent.item(), abs=2e-5)


def test_temperature_and_per_token_side_inputs(tiny_models):
    from vlgrpo.modules import get_module
    from vlgrpo.modules.loading import load_model_and_processor

    module = get_module("qwen")
    model, processor = load_model_and_processor(tiny_models["qwen2-vl"], module)
    batch = make_batch(module, processor, num_prompts=2, group_size=1, max_len=4)
    inputs = build_rows_inputs(module, processor, batch.prompts_text, batch.images, [0, 1])
    fwd = module.append_completions(inputs, batch.completion_ids, batch.completion_mask)
    n, p = inputs["input_ids"].shape
    for k, v in inputs.items():
        if k not in ("input_ids", "attention_mask") and v.dim() == 2 and tuple(v.shape) == (n, p) and not v.is_floating_point():
            assert fwd[k].shape == (n, p + 4) and torch.all(fwd[k][:, p:] == 0)
    with torch.no_grad():
        lp1 = per_token_logprobs(model, module, inputs, batch.completion_ids, batch.completion_mask)
        lp2 = per_token_logprobs(model, module, inputs, batch.completion_ids, batch.completion_mask,
                                 temperature=2.0)
    assert not torch.allclose(lp1, lp2)
    with torch.no_grad():
        logits = model(**fwd, use_cache=False).logits[:, p - 1:-1].float()
    m = batch.completion_mask.bool()
    for temp, lp in [(1.0, lp1), (2.0, lp2)]:
        ref = torch.log_softmax(logits / temp, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp[m], ref[m], atol=2e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_selective_logprobs_value_grad_and_entropy(temperature, dtype):
    """The chunked autograd function vs plain log_softmax (values, gradient, entropy)."""
    from vlgrpo.learner.logprobs import selective_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)

    x = logits.clone().requires_grad_(True)
    lp, ent = selective_logprobs_and_entropy(x, targets, with_entropy=True, temperature=temperature,
                                             chunk_tokens=4)  # chunks cross rows
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and not ent.requires_grad
    (lp.double() * w).sum().backward()

    y = logits.clone().double().requires_grad_(True)
    ref_all = torch.log_softmax(y / temperature, -1)
    ref = ref_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (ref * w).sum().backward()
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lp.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=1e-5)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), y.grad, **tol)
    if dtype == torch.float64:
        f = lambda z: selective_logprobs_and_entropy(z, targets, temperature=temperature,  # noqa: E731
                                                     chunk_tokens=4)[0]
        # float32 inside: gradcheck against finite differences with a loose tolerance
        assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-3,
                                        atol=1e-3, rtol=1e-3)
