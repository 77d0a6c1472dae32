"""GRPO loss and advantages against naive, loop-based reference computations (values and grads)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from vlgrpo.learner.grpo import (
    group_advantages,
    grpo_loss,
    normalize_loss_agg,
    truncated_importance_weights,
)

AGGS = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]


# ----------------------------------------------------------------------------------------------
# naive references (python loops, scalar autograd)
# ----------------------------------------------------------------------------------------------
def naive_advantages(rewards: list[float], g: int, scale_by_std: bool, eps: float):
    out, zero_groups = [], 0
    for start in range(0, len(rewards), g):
        grp = rewards[start:start + g]
        if all(x == grp[0] for x in grp):
            zero_groups += 1
            out += [0.0] * g
            continue
        mu = sum(grp) / g
        sd = statistics.stdev(grp)  # unbiased (n - 1)
        out += [(x - mu) / (sd + eps) if scale_by_std else (x - mu) for x in grp]
    return out, zero_groups


def naive_loss(lp, old, adv, mask, ref, beta, el, eh, agg, max_len=None, num_seqs=None,
               num_tokens=None, iw=None):
    """lp: leaf tensor [N, T]; everything else plain python lists / floats."""
    n, t = lp.shape
    num_seqs = n if num_seqs is None else num_seqs
    if num_tokens is None:
        num_tokens = max(sum(int(mask[i][j]) for i in range(n) for j in range(t)), 1)
    max_len = t if max_len is None else max_len
    total = lp.new_zeros(())
    for i in range(n):
        seq_sum = lp.new_zeros(())
        count = 0
        for j in range(t):
            if not mask[i][j]:
                continue
            count += 1
            x = lp[i, j]
            ratio = torch.exp(x - old[i][j])
            unclipped = ratio * adv[i]
            lo, hi = 1.0 - el, 1.0 + eh
            rc = ratio
            if ratio.item() < lo:
                rc = ratio * 0 + lo
            elif ratio.item() > hi:
                rc = ratio * 0 + hi
            clipped = rc * adv[i]
            obj = unclipped if unclipped.item() <= clipped.item() else clipped
            tok = -obj
            if iw is not None:
                tok = tok * iw[i][j]
            if beta:
                d = ref[i][j] - x
                tok = tok + beta * (torch.exp(d) - d - 1)
            seq_sum = seq_sum + tok
        if agg == "seq_mean_token_mean":
            total = total + seq_sum / max(count, 1) / num_seqs
        elif agg == "token_mean":
            total = total + seq_sum / num_tokens
        else:
            total = total + seq_sum / (num_seqs * max_len)
    return total


def make_batch(n=6, t=7, seed=0, spread=0.6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, t, generator=g, dtype=dtype) * 3 - 0.05
    # old log-probs differ by up to +-spread so ratios land on both sides of the clip range
    old = lp + (torch.rand(n, t, generator=g, dtype=dtype) * 2 - 1) * spread
    ref = lp + (torch.rand(n, t, generator=g, dtype=dtype) * 2 - 1) * 0.5
    adv = torch.randn(n, generator=g, dtype=dtype)
    adv[1] = 0.0  # a zero-advantage row (zero-std group)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[2] = 0  # a row without valid tokens
    lengths[0] = t
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1))
    # garbage in masked positions must not leak
    lp = torch.where(mask, lp, torch.full_like(lp, -50.0))
    old = torch.where(mask, old, torch.full_like(old, float("-inf")))
    ref = torch.where(mask, ref, torch.full_like(ref, 30.0))
    return lp, old, adv, mask, ref


def to_lists(*xs):
    return [x.tolist() for x in xs]


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_naive(scale_by_std):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 3, (24,), generator=g).float() * 0.5
    rewards[0:4] = 1.0  # zero-std group
    rewards[8:12] = 0.1  # zero-std group with a value whose mean is inexact in float
    adv, nz = group_advantages(rewards, 4, scale_by_std=scale_by_std, eps=1e-4)
    ref, nz_ref = naive_advantages(rewards.tolist(), 4, scale_by_std, 1e-4)
    assert nz == nz_ref >= 2
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert torch.all(adv[0:4] == 0) and torch.all(adv[8:12] == 0)
    # per-group sums are zero
    torch.testing.assert_close(adv.view(-1, 4).sum(1), torch.zeros(6), atol=1e-5, rtol=0)


def test_group_advantages_std_scaling_and_edge_cases():
    adv, nz = group_advantages(torch.tensor([0.0, 1.0]), 2)
    # unbiased std of {0,1} = sqrt(0.5)
    expected = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-expected, expected]))
    assert nz == 0
    adv, nz = group_advantages(torch.tensor([3.0, -1.0, 2.0]), 1)
    assert nz == 3 and torch.all(adv == 0)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2), 2)


# ----------------------------------------------------------------------------------------------
# loss: every aggregation vs naive, value and gradient
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_grad_match_naive(agg, beta, eps):
    el, eh = eps
    lp, old, adv, mask, ref = make_batch(seed=3)
    max_len = 9 if agg == "seq_mean_token_sum_norm" else None

    x = lp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, adv, mask, ref_logprobs=ref, beta=beta, epsilon_low=el,
                              epsilon_high=eh, loss_agg=agg, max_len_norm=max_len)
    loss.backward()

    y = lp.clone().requires_grad_(True)
    old_l, adv_l, mask_l, ref_l = to_lists(old, adv, mask, ref)
    ref_loss = naive_loss(y, old_l, adv_l, mask_l, ref_l, beta, el, eh, agg, max_len=max_len)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(x.grad[~mask] == 0), "masked tokens must get no gradient"
    assert torch.all(x.grad[1] == 0) if beta == 0 else True  # zero advantage row
    # the clipped tokens carry no policy gradient (beta = 0)
    if beta == 0:
        r = torch.exp(lp - old)
        a = adv.unsqueeze(1).expand_as(r)
        clipped = mask & (((r < 1 - el) & (a < 0)) | ((r > 1 + eh) & (a > 0)))
        assert clipped.any()
        assert torch.all(x.grad[clipped] == 0)
    assert torch.isfinite(loss)
    assert set(metrics) >= {"pg_loss", "kl_loss", "ratio_mean", "clip_frac_low", "clip_frac_high",
                            "clip_frac", "num_tokens", "num_seqs", "ratio_min", "ratio_max"}
    assert ("kl_mean" in metrics)  # ref given: KL reported even at beta = 0


def test_both_clip_sides_hit_and_metrics_match_naive():
    lp, old, adv, mask, ref = make_batch(n=8, t=9, seed=5, spread=0.8)
    el, eh = 0.2, 0.28
    loss, m = grpo_loss(lp, old, adv, mask, ref_logprobs=ref, epsilon_low=el, epsilon_high=eh)
    low = high = n_tok = 0
    ratios, kls = [], []
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if not mask[i, j]:
                continue
            n_tok += 1
            r = math.exp(lp[i, j].item() - old[i, j].item())
            ratios.append(r)
            d = ref[i, j].item() - lp[i, j].item()
            kls.append(math.exp(d) - d - 1)
            if r < 1 - el and adv[i] < 0:
                low += 1
            if r > 1 + eh and adv[i] > 0:
                high += 1
    assert low > 0 and high > 0, "test data must clip on both sides"
    assert m["num_tokens"].item() == n_tok
    assert m["clip_frac_low"].item() == pytest.approx(low / n_tok)
    assert m["clip_frac_high"].item() == pytest.approx(high / n_tok)
    assert m["clip_frac"].item() == pytest.approx((low + high) / n_tok)
    assert m["ratio_mean"].item() == pytest.approx(sum(ratios) / n_tok)
    assert m["ratio_min"].item() == pytest.approx(min(ratios))
    assert m["ratio_max"].item() == pytest.approx(max(ratios))
    assert m["kl_mean"].item() == pytest.approx(sum(kls) / n_tok)
    assert m["kl_loss"].item() == 0.0
    assert m["pg_loss"].item() == pytest.approx(loss.item())


def test_importance_weights_match_naive():
    lp, old, adv, mask, ref = make_batch(seed=11)
    samp = old + 0.3 * torch.randn_like(old)
    iw = truncated_importance_weights(torch.where(mask, old, 0), torch.where(mask, samp, 0), 2.0)
    assert iw.max() <= 2.0
    x = lp.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, adv, mask, loss_agg="token_mean", importance_weights=iw)
    loss.backward()
    y = lp.clone().requires_grad_(True)
    old_l, adv_l, mask_l, iw_l = to_lists(old, adv, mask, iw)
    ref_loss = naive_loss(y, old_l, adv_l, mask_l, None, 0.0, 0.2, 0.2, "token_mean", iw=iw_l)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(x.grad, y.grad)


def test_on_policy_old_none_is_ratio_one():
    """μ = 1: old = logprobs.detach(); loss = -mean(A) style and grad = -A / len (GRPO agg)."""
    lp, _, adv, mask, _ = make_batch(seed=7)
    x = lp.clone().requires_grad_(True)
    loss, m = grpo_loss(x, None, adv, mask)
    loss.backward()
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0
    n = lp.shape[0]
    lens = mask.sum(1).clamp(min=1).double()
    expected_grad = -(adv / lens).unsqueeze(1) / n * mask
    torch.testing.assert_close(x.grad, expected_grad)
    expected_loss = -(adv * (mask.sum(1) > 0)).sum() / n
    torch.testing.assert_close(loss.detach(), expected_loss)


def test_float32_and_bool_or_int_masks_agree():
    lp, old, adv, mask, ref = make_batch(seed=2)
    a, _ = grpo_loss(lp.float(), old.float(), adv.float(), mask, ref.float(), beta=0.1)
    b, _ = grpo_loss(lp.float(), old.float(), adv.float(), mask.long(), ref.float(), beta=0.1)
    assert torch.equal(a, b)
    c, _ = grpo_loss(lp, old, adv, mask, ref, beta=0.1)
    torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# micro-batches / data-parallel ranks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGGS)
def test_micro_batches_sum_to_full_batch(agg):
    lp, old, adv, mask, ref = make_batch(n=10, t=8, seed=4)
    beta = 0.05
    max_len = 12
    x = lp.clone().requires_grad_(True)
    full, _ = grpo_loss(x, old, adv, mask, ref, beta=beta, loss_agg=agg, max_len_norm=max_len)
    full.backward()

    y = lp.clone().requires_grad_(True)
    n_seq, n_tok = lp.shape[0], int(mask.sum())
    total = 0.0
    for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 10)]:  # uneven pieces
        # each micro-batch may be trimmed to its own longest completion (different T)
        t_piece = int(mask[lo:hi].sum(1).max().clamp(min=1))
        part, _ = grpo_loss(y[lo:hi, :t_piece], old[lo:hi, :t_piece], adv[lo:hi],
                            mask[lo:hi, :t_piece], ref[lo:hi, :t_piece], beta=beta, loss_agg=agg,
                            max_len_norm=max_len, global_num_seqs=n_seq, global_num_tokens=n_tok)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_data_parallel_average_with_loss_scale_equals_full_batch(agg):
    """Each of W ranks scales its loss by W; averaging the rank gradients (what DeepSpeed's
    all-reduce does) recovers the full-batch gradient."""
    lp, old, adv, mask, _ = make_batch(n=8, t=6, seed=9)
    x = lp.clone().requires_grad_(True)
    full, _ = grpo_loss(x, old, adv, mask, loss_agg=agg, max_len_norm=6)
    full.backward()
    world = 2
    grads = []
    n_seq, n_tok = lp.shape[0], int(mask.sum())
    for rank_rows in [(0, 3), (3, 8)]:  # uneven shards
        y = lp.clone().requires_grad_(True)
        lo, hi = rank_rows
        part, _ = grpo_loss(y[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], loss_agg=agg,
                            max_len_norm=6, global_num_seqs=n_seq, global_num_tokens=n_tok,
                            loss_scale=world)
        part.backward()
        grads.append(y.grad)
    torch.testing.assert_close(sum(grads) / world, x.grad, rtol=1e-12, atol=1e-12)


def test_argument_errors_and_aliases():
    lp, old, adv, mask, ref = make_batch()
    with pytest.raises(ValueError):
        grpo_loss(lp, old, adv, mask, beta=0.1)  # beta without ref
    with pytest.raises(ValueError):
        grpo_loss(lp, old, adv, mask, loss_agg="nope")
    with pytest.raises(ValueError):
        grpo_loss(lp, old, adv[:-1], mask)
    assert normalize_loss_agg("dapo") == "token_mean"
    assert normalize_loss_agg("grpo") == "seq_mean_token_mean"
    assert normalize_loss_agg("dr_grpo") == "seq_mean_token_sum_norm"
    a, _ = grpo_loss(lp, old, adv, mask, loss_agg="dr_grpo")
    b, _ = grpo_loss(lp, old, adv, mask, loss_agg="seq_mean_token_sum_norm")
    assert torch.equal(a, b)


def test_all_masked_batch_is_zero_and_finite():
    lp, old, adv, mask, ref = make_batch()
    empty = torch.zeros_like(mask)
    x = lp.clone().requires_grad_(True)
    for agg in AGGS:
        loss, m = grpo_loss(x, old, adv, empty, ref, beta=0.1, loss_agg=agg)
        assert loss.item() == 0.0 and m["num_tokens"].item() == 0
        assert torch.isfinite(m["ratio_min"]) and torch.isfinite(m["ratio_max"])
        loss.backward()
        assert torch.all(x.grad == 0)


# ----------------------------------------------------------------------------------------------
# RLOO (leave-one-out baseline) and GSPO (sequence-level ratio), against loops
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_by_std", [False, True])
def test_rloo_advantages_match_leave_one_out_loop(scale_by_std):
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(20, generator=g)
    rewards[5:10] = 0.7  # zero-spread group
    adv, nz = group_advantages(rewards, 5, scale_by_std=scale_by_std, leave_one_out=True)
    ref = []
    for s in range(0, 20, 5):
        grp = rewards[s:s + 5].tolist()
        for i, r in enumerate(grp):
            others = grp[:i] + grp[i + 1:]
            a = r - sum(others) / len(others)
            ref.append(a / (statistics.stdev(grp) + 1e-4) if scale_by_std and len(set(grp)) > 1 else a)
    assert nz == 1 and torch.all(adv[5:10] == 0)
    torch.testing.assert_close(adv, torch.tensor(ref, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1, leave_one_out=True)


def naive_gspo_loss(lp, old, adv, mask, el, eh, agg, num_tokens=None):
    """One ratio per row: exp(mean over the row's valid tokens of (logp - old)), clipped as a whole;
    the row's loss -min(s A, clip(s) A) counts once per valid token."""
    n, t = lp.shape
    num_tokens = num_tokens or max(int(sum(sum(r) for r in mask)), 1)
    total = lp.new_zeros(())
    for i in range(n):
        idx = [j for j in range(t) if mask[i][j]]
        if not idx:
            continue
        s = torch.exp(sum(lp[i, j] - old[i][j] for j in idx) / len(idx))
        sc = s if 1 - el <= s.item() <= 1 + eh else s * 0 + min(max(s.item(), 1 - el), 1 + eh)
        row = -(s * adv[i] if (s * adv[i]).item() <= (sc * adv[i]).item() else sc * adv[i])
        total = total + (row / n if agg == "seq_mean_token_mean" else row * len(idx) / num_tokens)
    return total


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("spread", [0.02, 0.6])  # inside and outside the clip range
def test_gspo_sequence_ratio_matches_naive_value_and_grad(agg, spread):
    lp, old, adv, mask, _ = make_batch(seed=7, spread=spread)
    el, eh = 3e-2, 4e-2
    x = lp.clone().requires_grad_(True)
    loss, m = grpo_loss(x, old, adv, mask, epsilon_low=el, epsilon_high=eh, loss_agg=agg,
                        importance_sampling_level="sequence")
    loss.backward()
    y = lp.clone().requires_grad_(True)
    o, a, mk = to_lists(old, adv, mask)
    ref = naive_gspo_loss(y, o, a, mk, el, eh, agg)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    # a control: the token-level ratio gives another loss on the same batch
    tok, _ = grpo_loss(lp, old, adv, mask, epsilon_low=el, epsilon_high=eh, loss_agg=agg)
    assert abs(tok.item() - ref.item()) > 1e-6
    assert m["ratio_min"] <= m["ratio_mean"] <= m["ratio_max"]
    with pytest.raises(ValueError, match="token or sequence"):
        grpo_loss(lp, old, adv, mask, importance_sampling_level="seq")
