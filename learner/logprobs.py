"""Per-token log-probs of completion tokens under a VLM, from the module's own model inputs, per row or with each
prompt once per micro-batch (shared prefix). Design: docs/design.md#log-probs-and-the-shared-prefix."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..modules.base import takes_logits_to_keep


def build_rows_inputs(module: Any, processor: Any, prompts_text: Sequence[str], images: Sequence[Sequence[Any]],
                      row_prompt_index: Sequence[int]) -> dict[str, torch.Tensor]:
    """``module.prepare_model_inputs`` for one row per completion (prompt repeated per row):
    left-padded prompt inputs with exactly the module's forward keys."""
    inputs = module.prepare_model_inputs(processor, [prompts_text[p] for p in row_prompt_index],
                                         [list(images[p]) for p in row_prompt_index])
    return module.forward_inputs(inputs)


def micro_cuts(row_prompt_index: Sequence[int], size: int) -> list[tuple[int, int]]:
    """``(start, end)`` rows of micro-batches of at most ``size`` rows; one that starts at a group's first row ends
    at a group's last where a whole group fits, so no group is cut (it would run its shared prompt twice)."""
    p, cuts, s = row_prompt_index, [], 0
    while s < len(p):
        e = g = min(s + size, len(p))
        while (s == 0 or p[s - 1] != p[s]) and s < g < len(p) and p[g - 1] == p[g]:
            g -= 1
        cuts.append((s, g if g > s else e))
        s = cuts[-1][1]
    return cuts


def build_micro_inputs(module: Any, processor: Any, prompts_text: Sequence[str], images: Sequence[Sequence[Any]],
                       row_prompt_index: Sequence[int], shared: bool = True
                       ) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """``(inputs, rows)`` of one micro-batch: with ``shared`` and a module that supports it, each distinct
    prompt processed once and ``rows`` ``[n]`` (long) its index per row; else ``build_rows_inputs``, None."""
    if not (shared and module.supports_shared_prefix):
        return build_rows_inputs(module, processor, prompts_text, images, row_prompt_index), None
    used = list(dict.fromkeys(row_prompt_index))
    rows = torch.tensor([used.index(p) for p in row_prompt_index], dtype=torch.long)
    return build_rows_inputs(module, processor, prompts_text, images, used), rows


def _shared_prefix_logits(model: torch.nn.Module, module: Any, inputs: dict[str, torch.Tensor], rows: torch.Tensor,
                          completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, T, V]`` scoring the completion tokens: the ``[n_p, P]`` prompts once with a cache,
    expanded to the ``n`` rows (``rows``), then the ``[n, T - 1]`` completion tokens over it."""
    first, kwargs = module.prefill_shared(model, inputs, rows)  # the prompt's last position scores token 0
    t, prompt_mask = completion_ids.shape[1], inputs["attention_mask"]
    rows = rows.to(prompt_mask.device)
    if t == 1:
        return first
    mask = torch.cat([prompt_mask.index_select(0, rows), completion_mask[:, :-1].to(prompt_mask)], dim=1)
    pos = module.completion_position_ids(model, module.forward_inputs(inputs), rows, t - 1)
    if pos is not None:
        kwargs["position_ids"] = pos
    rest = model(input_ids=completion_ids[:, :-1].to(inputs["input_ids"]), attention_mask=mask, **kwargs).logits
    return torch.cat([first, rest], dim=1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    lg = logits.float()
    return lg / temperature if temperature != 1.0 else lg


class _SelectiveLogProb(torch.autograd.Function):
    """``log_softmax(logits / temperature)[targets]`` over ``[M, V]`` rows, in float32, a chunk of
    rows at a time. Saves only the input logits (any dtype) and the per-row logsumexp for the
    backward, which recomputes the softmax chunk by chunk: no full-size float32 copy of the
    logits is ever held (it would be 2x the bf16 logits, per micro-batch, until backward)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int):
        m = logits.shape[0]
        out = torch.empty(m, dtype=torch.float32, device=logits.device)
        lse = torch.empty(m, dtype=torch.float32, device=logits.device)
        for s in range(0, m, chunk):
            lg = _scaled(logits[s:s + chunk], temperature)
            lse[s:s + chunk] = torch.logsumexp(lg, dim=-1)
            out[s:s + chunk] = lg.gather(-1, targets[s:s + chunk].unsqueeze(-1)).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_out[s:s + chunk].float()
            gl = torch.exp(_scaled(logits[s:s + chunk], t) - lse[s:s + chunk].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
            gl.scatter_add_(-1, targets[s:s + chunk].unsqueeze(-1), g.unsqueeze(-1))
            if t != 1.0:
                gl.div_(t)
            grad[s:s + chunk] = gl.to(grad.dtype)
        return grad, None, None, None


def selective_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                                   temperature: float = 1.0, chunk_tokens: int = 1024
                                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_softmax(logits / temperature)`` at ``targets`` (``[..., V]`` -> ``[...]``, float32,
    differentiable) and, when asked, the entropy (no grad), ``chunk_tokens`` positions at a time."""
    shape = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    lp = _SelectiveLogProb.apply(flat, targets.reshape(-1), float(temperature), int(chunk_tokens))
    ent = None
    if with_entropy:
        with torch.no_grad():
            ents = []
            for s in range(0, flat.shape[0], chunk_tokens):
                logp = torch.log_softmax(_scaled(flat[s:s + chunk_tokens], temperature), dim=-1)
                ents.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))  # 0 * -inf -> 0
            ent = torch.cat(ents).reshape(shape) if ents else flat.new_zeros(shape, dtype=torch.float32)
    return lp.reshape(shape), ent


def per_token_logprobs(model: torch.nn.Module, module: Any, inputs: dict[str, torch.Tensor],
                       completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False, suppress_ids: Optional[Sequence[int]] = None,
                       rows: Optional[torch.Tensor] = None):
    """Log-probs ``[N, T]`` (float32, 0 on padding) of ``completion_ids`` given the prompt ``inputs``: the
    left-padded ``prepare_model_inputs`` output for the N rows (one per completion; ``build_rows_inputs``),
    or with ``rows`` ``[N]`` for the distinct prompts (shared prefix; ``build_micro_inputs``).
    With ``return_entropy=True``: ``(logprobs, entropy)``, the entropy ``[N, T]`` computed without grad.
    ``suppress_ids``: tokens the sampler never emits (the module's vision placeholders); they are
    removed from the distribution, so the log-probs are those of the policy that generated."""
    t = completion_ids.shape[1]
    if rows is not None:
        logits = _shared_prefix_logits(model, module, inputs, rows, completion_ids, completion_mask)
    else:
        fwd = module.append_completions(module.forward_inputs(inputs), completion_ids, completion_mask)
        kwargs: dict[str, Any] = {"use_cache": False}
        if takes_logits_to_keep(type(getattr(model, "module", model))):  # a DeepSpeed engine wraps the model
            kwargs["logits_to_keep"] = t + 1
        out = model(**fwd, **kwargs)
        logits = (out.logits if hasattr(out, "logits") else out[0])[:, -(t + 1):-1, :]  # P-1+j predicts token j
    if suppress_ids:
        ids = torch.as_tensor(list(suppress_ids), device=logits.device)
        logits = logits.index_fill(-1, ids, float("-inf"))
    targets = completion_ids.to(logits.device, torch.long)
    lp, ent = selective_logprobs_and_entropy(logits, targets, with_entropy=return_entropy,
                                             temperature=temperature)
    mask = completion_mask.to(lp.device).bool()
    lp = lp.masked_fill(~mask, 0.0)
    return (lp, ent.masked_fill(~mask, 0.0)) if return_entropy else lp
