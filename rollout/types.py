"""Messages that cross actor boundaries on the rollout side. Plain dataclasses of tensors, lists and
PIL images: picklable by Ray, nothing the learner must re-parse."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from PIL import Image


@dataclass
class Sample:
    """One prompt of the dataset, ready for a VLM module.

    ``prompt`` is a chat conversation (transformers format, one ``{"type": "image"}`` item per image)
    and ``images`` are the images in order. ``solution`` is the ground-truth answer text used by
    accuracy rewards; ``accu_reward_method`` picks how it is compared (``mcq``, ``yes_no``, ...).
    """

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
    """Scored completions of a set of prompts, group-major: rows ``g*n .. g*n+n-1`` belong to
    prompt ``g``. Everything the learner needs to rebuild model inputs with
    ``prepare_model_inputs(prompts_text, images)`` and score completion tokens."""

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

    @property
    def num_prompts(self) -> int:
        return len(self.sample_ids)

    def total_rewards(self) -> torch.Tensor:
        """Weighted sum over reward functions, shape [N]."""
        w = torch.tensor(self.reward_weights, dtype=torch.float32)
        return (self.rewards * w).sum(-1)
