"""Per-token log-probs of completion tokens under a VLM, from the module's own model inputs.

The sequence fed to the model is ``[left-padded prompt | right-padded completion]``:

    input_ids      = cat(prompt input_ids, completion_ids)
    attention_mask = cat(prompt attention_mask, completion_mask)
    + the module's custom multimodal keywords (``pixel_values``, ``image_grid_thw``, ...)

and nothing else (``module.forward_inputs``). Per-token custom inputs with the prompt's
``[N, P]`` shape (e.g. Qwen's ``mm_token_type_ids`` on transformers >= 5) are extended with zeros
over the completion. The logit at position ``P - 1 + t`` scores completion token ``t``; only the
last ``T + 1`` positions are computed when the model accepts ``logits_to_keep``.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch

_LOGITS_TO_KEEP_CACHE: dict[type, bool] = {}


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DeepSpeed engine -> wrapped model
    cls = type(inner)
    if cls not in _LOGITS_TO_KEEP_CACHE:
        try:
            params = inspect.signature(inner.forward).parameters
            _LOGITS_TO_KEEP_CACHE[cls] = "logits_to_keep" in params
        except (TypeError, ValueError):
            _LOGITS_TO_KEEP_CACHE[cls] = False
    return _LOGITS_TO_KEEP_CACHE[cls]


def build_rows_inputs(
    module: Any,
    processor: Any,
    prompts_text: Sequence[str],
    images: Sequence[Sequence[Any]],
    row_prompt_index: Sequence[int],
) -> dict[str, torch.Tensor]:
    """``module.prepare_model_inputs`` for one row per completion (prompt repeated per row):
    left-padded prompt inputs with exactly the module's forward keys."""
    texts = [prompts_text[p] for p in row_prompt_index]
    ims = [list(images[p]) for p in row_prompt_index]
    inputs = module.prepare_model_inputs(processor, texts, ims)
    return module.forward_inputs(inputs)


def concat_completion(
    inputs: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + completion (see the module docstring)."""
    prompt_ids = inputs["input_ids"]
    n, p = prompt_ids.shape
    if completion_ids.shape[0] != n:
        raise ValueError(f"{n} prompt rows but {completion_ids.shape[0]} completion rows")
    device = prompt_ids.device
    c_ids = completion_ids.to(device=device, dtype=prompt_ids.dtype)
    c_mask = completion_mask.to(device=device, dtype=inputs["attention_mask"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([prompt_ids, c_ids], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], c_mask], dim=1)
    t = c_ids.shape[1]
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask") or not isinstance(v, torch.Tensor):
            continue
        # per-token side inputs (e.g. mm_token_type_ids): zeros over the completion
        if v.dim() == 2 and tuple(v.shape) == (n, p) and not v.is_floating_point():
            out[k] = torch.cat([v, v.new_zeros(n, t)], dim=1)
    return out


def selective_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    with_entropy: bool = False,
    chunk_rows: int = 8,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log_softmax(logits)[targets]`` in float32 (and the entropy, no grad), a few rows at a
    time so that only one float32 copy of a chunk's logits exists at once."""
    lps, ents = [], []
    for start in range(0, logits.shape[0], chunk_rows):
        lg = logits[start:start + chunk_rows].float()
        tg = targets[start:start + chunk_rows]
        lse = torch.logsumexp(lg, dim=-1)
        lps.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.softmax(lg, dim=-1)
                ents.append(lse - (probs * lg).sum(-1))
    return torch.cat(lps, 0), (torch.cat(ents, 0) if with_entropy else None)


def per_token_logprobs(
    model: torch.nn.Module,
    module: Any,
    inputs: dict[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs ``[N, T]`` (float32) of ``completion_ids`` given the prompt ``inputs``.

    ``inputs`` is the left-padded ``prepare_model_inputs`` output for the N rows (one row per
    completion; see ``build_rows_inputs``). The forward receives exactly ``module.forward_inputs``
    of the concatenation. Masked positions (padding) hold 0. With ``return_entropy=True`` returns
    ``(logprobs, entropy)``, the entropy ``[N, T]`` being computed without grad.
    """
    fwd = concat_completion(module.forward_inputs(inputs), completion_ids, completion_mask)
    t = completion_ids.shape[1]
    kwargs: dict[str, Any] = {"use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = t + 1
    out = model(**fwd, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits[:, -(t + 1):-1, :]  # position P-1+j predicts completion token j
    if temperature != 1.0:
        logits = logits / temperature
    targets = fwd["input_ids"][:, -t:]
    lp, ent = selective_logprobs_and_entropy(logits, targets, with_entropy=return_entropy)
    mask = completion_mask.to(lp.device).bool()
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    if return_entropy:
        ent = torch.where(mask, ent, torch.zeros_like(ent))
        return lp, ent
    return lp
