"""GRPO objective: group-relative advantages and the clipped policy-gradient loss; pure torch, called per
micro-batch by the learner. Formulas, aggregations, micro-batch counts: docs/design.md#the-grpo-loss."""
from __future__ import annotations

from typing import Optional

import torch

LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
_LOSS_AGG_ALIASES = {"grpo": "seq_mean_token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"}


def normalize_loss_agg(loss_agg: str) -> str:
    """Canonical aggregation name (accepts the aliases ``grpo``/``dapo``/``dr_grpo``)."""
    name = _LOSS_AGG_ALIASES.get(loss_agg, loss_agg)
    if name not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {LOSS_AGGREGATIONS} "
                         f"(aliases {sorted(_LOSS_AGG_ALIASES)})")
    return name


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4, leave_one_out: bool = False) -> tuple[torch.Tensor, int]:
    """Group-relative advantages for group-major rewards: ``rewards[N]`` holds ``N / group_size`` groups,
    rows ``g*G .. g*G+G-1`` being group ``g``. Returns ``(advantages[N] float32, num_zero_std_groups)``:

    * ``scale_by_std=True`` (GRPO): ``(r - mean_g) / (std_g + eps)``, ``std_g`` unbiased (as TRL);
    * ``scale_by_std=False`` (Dr. GRPO): ``r - mean_g``;
    * ``leave_one_out`` (RLOO): ``r - mean_{g, j != i} = (r - mean_g) * G / (G - 1)`` before any scaling.

    A group whose rewards are all equal gets exactly 0 (no float noise from the mean) and is
    counted in ``num_zero_std_groups`` (a group of size 1 always is).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split in groups of {group_size}")
    r = rewards.detach().to(torch.float32).view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    adv = r - mean
    if leave_one_out:
        if group_size < 2:
            raise ValueError("a leave-one-out baseline (RLOO) needs groups of at least 2 completions")
        adv = adv * (group_size / (group_size - 1))
    zero = (r.max(dim=1).values == r.min(dim=1).values)  # [num_groups]
    if scale_by_std:
        std = r.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)
    adv = torch.where(zero.unsqueeze(1), torch.zeros_like(adv), adv)
    return adv.reshape(-1), int(zero.sum().item())


def grpo_loss(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor], advantages: torch.Tensor,
              mask: torch.Tensor, ref_logprobs: Optional[torch.Tensor] = None, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_agg: str = "seq_mean_token_mean",
              max_len_norm: Optional[int] = None, *, global_num_seqs: Optional[float] = None,
              global_num_tokens: Optional[float] = None, importance_weights: Optional[torch.Tensor] = None,
              loss_scale: float = 1.0, importance_sampling_level: str = "token"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO loss of one (micro-)batch (formulas: docs/design.md#the-grpo-loss).

    ``logprobs`` ``[N, T]`` (with grad); ``old_logprobs`` ``[N, T]`` before this batch's first update (no grad;
    ``None``: ``logprobs.detach()``, μ = 1); ``advantages`` ``[N]``; ``mask`` ``[N, T]`` 1 on tokens that count
    (bool or 0/1). ``ref_logprobs`` ``[N, T]`` is required when ``beta`` (k3 KL coefficient) != 0; given with
    ``beta == 0`` the KL is only reported. Clip range ``[1 - epsilon_low, 1 + epsilon_high]``. ``loss_agg``: one
    of ``LOSS_AGGREGATIONS`` or an alias; ``max_len_norm``: Dr. GRPO's constant (default ``T``);
    ``global_num_seqs`` / ``global_num_tokens``: the whole optimiser step's counts (design notes).
    ``importance_weights`` ``[N, T]`` (no grad) multiply the policy-gradient term (truncated IS); ``loss_scale``
    multiplies the loss (``world_size`` under data-parallel averaging); ``importance_sampling_level``:
    ``"token"`` (GRPO) or ``"sequence"`` (GSPO).

    Returns ``(loss, metrics)``: ``loss`` a scalar with grad, ``metrics`` detached 0-dim tensors: ``pg_loss`` and
    ``kl_loss`` (before ``loss_scale``), token means over this call's valid tokens (``ratio_mean``, ``kl_mean``,
    ``clip_frac_low``, ``clip_frac_high``, ``clip_frac``, ``adv_mean``), ``ratio_min``, ``ratio_max`` and the
    counts ``num_tokens`` / ``num_seqs`` (weights across micro-batches)."""
    agg = normalize_loss_agg(loss_agg)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got {tuple(logprobs.shape)}")
    n, t = logprobs.shape
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if advantages.shape != (n,):
        raise ValueError(f"advantages must be [{n}], got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")

    m = mask.to(logprobs.dtype)
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [N, 1]

    log_ratio = logprobs - old_logprobs.to(logprobs.dtype)
    # Masked positions may hold garbage (e.g. -inf): keep them finite so 0 * x stays 0.
    log_ratio = torch.where(m > 0, log_ratio, torch.zeros_like(log_ratio))
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)).expand(n, t)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    pg = -torch.min(ratio * adv, clipped * adv)
    if importance_weights is not None:
        pg = pg * importance_weights.detach().to(pg.dtype)

    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs.to(logprobs.dtype) - logprobs
        d = torch.where(m > 0, d, torch.zeros_like(d))
        kl = torch.exp(d) - d - 1.0

    num_tokens_local = m.sum()
    num_seqs = float(global_num_seqs) if global_num_seqs is not None else float(n)
    if num_seqs <= 0:
        raise ValueError("global_num_seqs must be positive")

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        xm = x * m
        if agg == "seq_mean_token_mean":  # a mean per row, then over rows
            return (xm.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)).sum() / num_seqs
        if agg == "token_mean":
            denom = (torch.as_tensor(float(global_num_tokens), dtype=x.dtype, device=x.device)
                     if global_num_tokens is not None else num_tokens_local.clamp(min=1.0))
            return xm.sum() / denom
        # seq_mean_token_sum_norm
        return xm.sum() / (num_seqs * (float(max_len_norm) if max_len_norm is not None else float(t)))

    loss = pg_loss = aggregate(pg)
    kl_loss = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if kl is not None and beta != 0.0:
        kl_loss = beta * aggregate(kl)
        loss = loss + kl_loss
    if loss_scale != 1.0:
        loss = loss * loss_scale

    with torch.no_grad():
        valid = m > 0
        denom = num_tokens_local.clamp(min=1.0)
        tmean = lambda x: (x * m).sum() / denom  # noqa: E731 - token mean over this call's valid tokens
        adv_b = adv.expand_as(ratio)
        low = ((ratio < 1.0 - epsilon_low) & (adv_b < 0)).to(m.dtype)
        high = ((ratio > 1.0 + epsilon_high) & (adv_b > 0)).to(m.dtype)
        has_valid = bool(valid.any())
        metrics = {"pg_loss": pg_loss.detach(), "kl_loss": kl_loss.detach(), "ratio_mean": tmean(ratio),
                   "ratio_min": ratio[valid].min() if has_valid else ratio.new_ones(()),
                   "ratio_max": ratio[valid].max() if has_valid else ratio.new_ones(()),
                   "clip_frac_low": tmean(low), "clip_frac_high": tmean(high), "clip_frac": tmean(low + high),
                   "adv_mean": tmean(adv_b), "num_tokens": num_tokens_local.detach(),
                   "num_seqs": torch.tensor(float(n), device=logprobs.device)}
        if kl is not None:
            metrics["kl_mean"] = tmean(kl)
    return loss, metrics


def truncated_importance_weights(old_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """``min(exp(old_logp - sampling_logp), cap)``: truncated importance sampling (TIS) between the
    sampler (e.g. vLLM) and the learner's log-probs of the same policy weights, as in TRL's
    ``vllm_importance_sampling_correction``. No grad."""
    with torch.no_grad():
        return torch.exp(old_logprobs.float() - sampling_logprobs.float()).clamp(max=cap).to(old_logprobs.dtype)
