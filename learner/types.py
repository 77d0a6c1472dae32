"""Configuration and the batch message of the learner (plain dataclasses, picklable by Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from .grpo import normalize_loss_agg


ALGORITHMS = ("grpo", "gspo", "rloo")
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


@dataclass
class LoraConfig:
    """``learner.lora``: LoRA adapters (peft); only they train; engines get the adapted weights merged."""

    rank: int = 0  # LoRA rank r; 0: off (full fine-tuning)
    alpha: float = 16  # the update is alpha / rank * B @ A
    dropout: float = 0.0
    # linear layers to adapt, by name or name suffix (outside the vision tower unless vision=true)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    vision: bool = False  # also adapt every linear layer of the vision tower (and projector)


@dataclass
class LearnerConfig:
    """The ``learner`` section of the run config: what a learner rank needs besides the model
    (``ModelConfig``); defaults follow TRL's ``GRPOConfig`` where they overlap. One ``train_step`` takes
    ``num_iterations`` optimiser steps over its batch, each accumulating over all micro-batches.
    ``derived`` fields are resolved from other sections (``cluster.config.derived``), never set by hand.
    """

    # placement (read by the cluster)
    num_ranks: int = 1
    gpus_per_rank: float = -1  # -1: 1 when the cluster has GPUs, else 0
    cpus_per_rank: float = 1

    # parallelism / memory
    zero_stage: int = 2  # 0: plain torch (gradients all-reduced by hand), 2 or 3: DeepSpeed ZeRO
    micro_batch_size: int = 64  # rows per forward/backward on one rank; grad accumulation is derived
    gradient_checkpointing: bool = False
    shared_prefix: bool = True  # each prompt's forward once per micro-batch, G rows over its KV cache (no grad ckpt)
    freeze_vision: bool = False  # freeze params matching module.get_vision_modules_keywords()
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (rank 0: full fine-tuning)
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU; or "bf16" / "fp16" / "fp32"
    offload_optimizer: bool = False  # ZeRO CPU optimizer offload (builds DeepSpeed's cpu_adam op)
    num_threads: Optional[int] = None  # torch threads per rank; None: the node's cores (sync), split (async)

    # optimiser and schedule
    lr: float = 5e-4  # the demo's tiny model; a 3B-7B VLM wants ~1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    min_lr_ratio: float = 0.0  # final lr / lr for linear and cosine
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping

    # GRPO objective
    beta: float = 0.04  # KL to the reference model (VLM-R1's default); 0 loads no reference model
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # > epsilon_low: DAPO clip-higher
    num_iterations: int = 1  # μ: optimiser steps per batch
    loss_agg: str = "seq_mean_token_mean"  # | token_mean | seq_mean_token_sum_norm (or grpo/dapo/dr_grpo)
    algorithm: str = "grpo"  # grpo | gspo (one importance ratio per sequence) | rloo (leave-one-out baseline)
    scale_adv_by_std: Optional[bool] = None  # advantages / the group's reward std; None: yes, except for rloo
    tis_cap: Optional[float] = None  # truncated importance sampling vs sampling_logprobs (e.g. 2.0)
    compute_entropy: bool = True

    # derived (resolved once by the run config; 0 / None only outside a run, e.g. in tests)
    total_steps: int = field(default=0, metadata={"derived": "trainer.total_steps x num_iterations"})
    max_completion_length: int = field(default=0, metadata={"derived": "rollout.max_tokens"})
    temperature: float = field(default=1.0, metadata={"derived": "rollout.temperature"})
    seed: int = field(default=0, metadata={"derived": "trainer.seed"})

    def __post_init__(self) -> None:
        for ok, msg in [(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}"),
                        (self.lora.rank >= 0 and self.lora.alpha > 0 and 0 <= self.lora.dropout < 1,
                         f"lora needs rank >= 0, alpha > 0 and 0 <= dropout < 1, got {self.lora}"),
                        (not self.lora.rank or self.zero_stage != 3,
                         "lora.rank > 0 is not supported with zero_stage 3; set learner.zero_stage=2"),
                        (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
                        (self.num_iterations >= 1, "num_iterations must be >= 1"),
                        (self.lr_schedule in ("constant", "linear", "cosine"),
                         f"lr_schedule must be constant, linear or cosine, got {self.lr_schedule!r}"),
                        (self.dtype in _DTYPES or self.dtype == "auto",
                         f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}"),
                        (self.gpus_per_rank == -1 or float(self.gpus_per_rank).is_integer(),
                         f"gpus_per_rank={self.gpus_per_rank}: a learner rank needs whole GPUs (-1: 1 where there "
                         "are GPUs); NCCL cannot sync two ranks on one GPU")]:
            if not ok:
                raise ValueError(msg)
        self.loss_agg = normalize_loss_agg(self.loss_agg)
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def torch_dtype(self, on_gpu: bool) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if on_gpu else torch.float32
        return _DTYPES[self.dtype]


@dataclass
class MicroBatch:
    """One forward/backward of a learner rank: model inputs of its rows and their ``[n, t]``
    completion tensors (trailing all-padding columns cut), on the CPU until ``Learner.to_device``."""

    inputs: dict[str, torch.Tensor]  # exactly the module's forward keys, prompt part
    ids: torch.Tensor
    mask: torch.Tensor  # bool
    adv: torch.Tensor  # [n] float32
    old: Optional[torch.Tensor] = None  # log-probs before this batch's first update
    ref: Optional[torch.Tensor] = None  # reference-model log-probs
    samp: Optional[torch.Tensor] = None  # the sampler's log-probs
    rows: Optional[torch.Tensor] = None  # [n] long: each row's prompt in ``inputs`` (shared prefix); None: per row


@dataclass
class TrainBatch:
    """The rows one learner rank trains on (its shard of the step's batch). Prompts are stored once
    (``prompts_text[p]``, ``images[p]``); ``prompt_index[i]`` names row ``i``'s prompt (default: group-major,
    equal groups). ``completion_ids`` / ``completion_mask`` and the float log-probs are ``[N, T]``,
    right-padded; ``old_logprobs``/``ref_logprobs`` None: computed by the learner (μ > 1 / β > 0);
    ``sampling_logprobs``: the sampler's (truncated IS, mismatch metric). ``global_num_*``: counts of the
    whole step across ranks (None: all-reduced by the learners)."""

    prompts_text: list[str]
    images: list[list[Image.Image]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    sampling_logprobs: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    prompt_index: Optional[list[int]] = None
    global_num_seqs: Optional[int] = None
    global_num_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        n, t = self.completion_ids.shape
        if self.completion_mask.shape != (n, t):
            raise ValueError(f"completion_mask {tuple(self.completion_mask.shape)} != ids {(n, t)}")
        if self.advantages.shape != (n,):
            raise ValueError(f"advantages must be [{n}], got {tuple(self.advantages.shape)}")
        for name in ("sampling_logprobs", "old_logprobs", "ref_logprobs"):
            x = getattr(self, name)
            if x is not None and x.shape != (n, t):
                raise ValueError(f"{name} must be [{n}, {t}], got {tuple(x.shape)}")
        if len(self.images) != len(self.prompts_text):
            raise ValueError(f"{len(self.prompts_text)} prompts but {len(self.images)} image lists")
        if self.prompt_index is None and self.prompts_text and n % len(self.prompts_text) != 0:
            raise ValueError(f"{n} rows do not divide into {len(self.prompts_text)} prompts; pass prompt_index")
        if self.prompt_index is not None and len(self.prompt_index) != n:
            raise ValueError(f"prompt_index has {len(self.prompt_index)} entries for {n} rows")

    @property
    def num_rows(self) -> int:
        return int(self.completion_ids.shape[0])

    def row_prompt_index(self) -> list[int]:
        if self.prompt_index is not None:
            return list(self.prompt_index)
        if not self.prompts_text:
            return []
        g = self.num_rows // len(self.prompts_text)
        return [i // g for i in range(self.num_rows)]

    def select(self, rows: Sequence[int]) -> "TrainBatch":
        """The rows ``rows`` (keeping only the prompts they use)."""
        rows = list(rows)
        pidx = self.row_prompt_index()
        used = sorted({pidx[i] for i in rows})
        remap = {p: k for k, p in enumerate(used)}
        idx = torch.tensor(rows, dtype=torch.long)

        def take(x):
            return None if x is None else x.index_select(0, idx)

        tensors = ("completion_ids", "completion_mask", "advantages", "sampling_logprobs", "old_logprobs",
                   "ref_logprobs")
        return replace(self, prompts_text=[self.prompts_text[p] for p in used], images=[self.images[p] for p in used],
                       prompt_index=[remap[pidx[i]] for i in rows], **{k: take(getattr(self, k)) for k in tensors})

    def split(self, num_shards: int) -> list["TrainBatch"]:
        """Contiguous shards, one per data-parallel rank, sizes differing by at most one row.
        Shards carry the global counts so each rank normalises the loss like the full batch."""
        n = self.num_rows
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        bounds = [round(k * n / num_shards) for k in range(num_shards + 1)]
        g_seqs = self.global_num_seqs if self.global_num_seqs is not None else n
        g_toks = (self.global_num_tokens if self.global_num_tokens is not None
                  else int(self.completion_mask.bool().sum()))
        return [replace(self.select(range(a, b)), global_num_seqs=g_seqs, global_num_tokens=g_toks)
                for a, b in zip(bounds, bounds[1:])]

    @classmethod
    def from_rollout(cls, rollout: Any, advantages: torch.Tensor) -> "TrainBatch":
        """From a ``vlgrpo.rollout.types.RolloutBatch`` (group-major) and its advantages ``[N]``."""
        return cls(prompts_text=list(rollout.prompts_text), images=[list(x) for x in rollout.images],
                   completion_ids=rollout.completion_ids, completion_mask=rollout.completion_mask,
                   advantages=advantages, sampling_logprobs=rollout.sampling_logprobs)
