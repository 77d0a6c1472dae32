"""Messages that cross actor boundaries on the rollout side. Plain dataclasses of tensors, lists and
PIL images: picklable by Ray, nothing the learner must re-parse."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from PIL import Image


@dataclass
class Sample:
    """One prompt of the dataset, ready for a VLM module: ``prompt`` a chat conversation (transformers format, one
    ``{"type": "image"}`` item per image), ``images`` in order, ``solution`` the ground-truth answer text of
    accuracy rewards, compared as ``accu_reward_method`` says (``mcq``, ``yes_no``, ...)."""

    sample_id: str
    prompt: list[dict[str, Any]]
    images: list[Image.Image]
    solution: str
    accu_reward_method: str = "default"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingConfig:
    n: int = 4  # completions per prompt (the GRPO group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_tokens: int = 64
    seed: Optional[int] = None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling policy (T=1 logits / temperature)
    text: str
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class GenerationResult:
    """The G completions of one prompt."""

    prompt_text: str
    completions: list[Completion]


@dataclass
class RolloutBatch:
    """Scored completions of a set of prompts, group-major (rows ``g*n .. g*n+n-1`` are prompt ``g``'s): what the
    learner needs to rebuild model inputs (``prepare_model_inputs(prompts_text, images)``) and score tokens."""

    sample_ids: list[str]  # per prompt
    prompts_text: list[str]  # per prompt (chat-template output)
    images: list[list[Image.Image]]  # per prompt
    completion_ids: torch.Tensor  # [N, T] long, right-padded with pad_token_id
    completion_mask: torch.Tensor  # [N, T] bool/int, 1 on real completion tokens
    sampling_logprobs: torch.Tensor  # [N, T] float32, 0 on padding
    rewards: torch.Tensor  # [N, F] float32: one column per reward function (unweighted)
    reward_names: list[str]
    reward_weights: list[float]
    completions_text: list[str]  # per row
    finish_reasons: list[str]  # per row
    weights_version: int
    group_size: int
    timings: dict[str, float] = field(default_factory=dict)
    reward_errors: dict[str, int] = field(default_factory=dict)
    pad_token_id: int = 0
    skipped_prompts: dict[str, list[str]] = field(default_factory=dict)  # reason -> sample ids not generated

    def total_rewards(self) -> torch.Tensor:
        """Weighted sum over reward functions, shape [N]."""
        w = torch.tensor(self.reward_weights, dtype=torch.float32)
        return (self.rewards * w).sum(-1)

    def groups(self, index: Sequence[int]) -> RolloutBatch:
        """The batch of the prompts ``index`` (in that order) and their groups' rows."""
        index, g = list(index), self.group_size
        rows = torch.tensor([p * g + j for p in index for j in range(g)], dtype=torch.long)
        per_prompt = {k: [getattr(self, k)[p] for p in index] for k in ("sample_ids", "prompts_text", "images")}
        per_row = {k: [getattr(self, k)[i] for i in rows.tolist()] for k in ("completions_text", "finish_reasons")}
        return replace(self, **per_prompt, **per_row, completion_ids=self.completion_ids[rows],
                       completion_mask=self.completion_mask[rows], sampling_logprobs=self.sampling_logprobs[rows],
                       rewards=self.rewards[rows])


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """Join several workers' batches (same reward functions and group size), completions re-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.completion_ids.shape[1] for p in parts)

    def cat(attr: str, pad_value=None) -> torch.Tensor:
        """Every part's rows; completions right-padded with ``pad_value`` to the longest."""
        xs = [getattr(p, attr) for p in parts]
        pad = torch.nn.functional.pad
        return torch.cat([x if pad_value is None else pad(x, (0, width - x.shape[1]), value=pad_value) for x in xs])

    timings = {k: max(p.timings.get(k, 0.0) for p in parts) for k in parts[0].timings}
    timings["completion_tokens"] = sum(p.timings.get("completion_tokens", 0.0) for p in parts)
    lists = {k: [x for p in parts for x in getattr(p, k)]
             for k in ("sample_ids", "prompts_text", "images", "completions_text", "finish_reasons")}
    return replace(  # reward names and weights, group size and pad id: the first part's (the same in all)
        parts[0], **lists, completion_ids=cat("completion_ids", parts[0].pad_token_id),
        completion_mask=cat("completion_mask", False), sampling_logprobs=cat("sampling_logprobs", 0.0),
        rewards=cat("rewards"), weights_version=min(p.weights_version for p in parts), timings=timings,
        reward_errors={k: sum(q.reward_errors.get(k, 0) for q in parts) for p in parts for k in p.reward_errors},
        skipped_prompts={r: [i for p in parts for i in p.skipped_prompts.get(r, [])]
                         for r in {r for p in parts for r in p.skipped_prompts}})
