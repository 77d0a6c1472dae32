"""The rollout worker: one generation engine + the reward functions, run as a Ray actor.

It turns prompts (``Sample``s with PIL images) into a scored, tensorised ``RolloutBatch``, joins the
weight-sync group as a receiver and loads new weights into its engine in place.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..modules import resolve_module
from .engine import GenerationEngine
from .rewards import RewardSet
from .types import RolloutBatch, Sample, SamplingConfig


@dataclass
class EngineConfig:
    model_path: str = ""
    module: str = "auto"
    engine: str = "auto"  # auto | vllm | transformers
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    processing_kwargs: dict[str, Any] = field(default_factory=dict)
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 2048
    enforce_eager: bool = False
    num_threads: int = 0  # torch CPU threads in the actor (Ray sets 1); 0 = leave as is
    seed: int = 0
    max_prompt_tokens: int = 0  # longer prompts are skipped and counted; 0 = the model's context - max_tokens


def resolve_engine_name(name: str) -> str:
    if name not in ("auto", "vllm", "transformers"):
        raise ValueError(f"rollout.engine {name!r}: use 'auto', 'vllm' or 'transformers'")
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm" if torch.cuda.is_available() else "transformers"


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def make_engine(cfg: EngineConfig) -> GenerationEngine:
    module = resolve_module(cfg.model_path, cfg.module)
    engine = resolve_engine_name(cfg.engine)
    if engine == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(cfg.model_path, module, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                          enforce_eager=cfg.enforce_eager, seed=cfg.seed, processing_kwargs=cfg.processing_kwargs)
    from .hf_engine import TransformersEngine

    return TransformersEngine(cfg.model_path, module, dtype=resolve_dtype(cfg.dtype),
                              device="cuda" if torch.cuda.is_available() else "cpu",
                              processing_kwargs=cfg.processing_kwargs)


class RolloutWorker:
    """Wrap with ``ray.remote`` (see ``cluster.placement``); usable in-process too."""

    def __init__(self, engine_cfg: EngineConfig, reward_specs: Sequence[Any], worker_id: int = 0) -> None:
        if engine_cfg.num_threads > 0:
            torch.set_num_threads(engine_cfg.num_threads)
        torch.manual_seed(engine_cfg.seed)  # sampling of the transformers engine is reproducible per worker
        self.worker_id = worker_id
        self.engine = make_engine(engine_cfg)
        self.rewards = RewardSet(list(reward_specs))
        self.sync_group = None
        tok = self.engine.tokenizer()
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        from ..modules.loading import read_model_config

        self.module, self.processor = self.engine.module, self.engine.processor  # for the prompt-length check
        text_cfg = read_model_config(engine_cfg.model_path)
        text_cfg = text_cfg.get("text_config", text_cfg) or text_cfg
        self.context_len = int(text_cfg.get("max_position_embeddings") or engine_cfg.max_model_len)
        self.max_prompt_tokens = engine_cfg.max_prompt_tokens

    def _prompt_fits(self, samples: Sequence[Sample], sampling: SamplingConfig) -> tuple[list[Sample], list[str]]:
        """Split off prompts (text + image tokens) too long for the model's context."""
        limit = self.max_prompt_tokens or (self.context_len - sampling.max_tokens)
        texts = self.module.prepare_prompt(self.processor, [{"prompt": s.prompt} for s in samples])
        keep, skipped = [], []
        for s, text in zip(samples, texts):
            n = self.module.prepare_model_inputs(self.processor, [text], [s.images])["input_ids"].shape[1]
            (keep if n <= limit else skipped).append(s)
        return keep, [s.sample_id for s in skipped]
    # -- generation --------------------------------------------------------------------------
    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig) -> RolloutBatch:
        t0 = time.perf_counter()
        version = self.engine.weights_version
        samples, too_long = self._prompt_fits(samples, sampling)
        results = self.engine.generate(samples, sampling) if samples else []
        t1 = time.perf_counter()
        comps = [c for r in results for c in r.completions]
        rows = [s for s, r in zip(samples, results) for _ in r.completions]
        lengths = [len(c.token_ids) for c in comps]
        if comps:
            scores, names, weights, errors = self.rewards.score([c.text for c in comps], rows,
                                                                completion_lengths=lengths)
        else:  # every prompt was skipped
            names, weights, errors = self.rewards.names, self.rewards.weights, {}
            scores = torch.zeros((0, len(names)), dtype=torch.float32)
        t2 = time.perf_counter()
        width = max(lengths + [1])
        ids = torch.full((len(comps), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(comps), width), dtype=torch.bool)
        logps = torch.zeros((len(comps), width), dtype=torch.float32)
        for i, c in enumerate(comps):
            n = len(c.token_ids)
            ids[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = True
            logps[i, :n] = torch.tensor(c.logprobs, dtype=torch.float32)
        return RolloutBatch(
            sample_ids=[s.sample_id for s in samples],
            prompts_text=[r.prompt_text for r in results],
            images=[list(s.images) for s in samples],
            completion_ids=ids,
            completion_mask=mask,
            sampling_logprobs=logps,
            rewards=scores,
            reward_names=list(names),
            reward_weights=list(weights),
            completions_text=[c.text for c in comps],
            finish_reasons=[c.finish_reason for c in comps],
            weights_version=version,
            group_size=sampling.n,
            timings={"generate_s": t1 - t0, "reward_s": t2 - t1, "worker": float(self.worker_id),
                     "completion_tokens": float(sum(lengths))},
            reward_errors=dict(errors),
            pad_token_id=self.pad_id,
            skipped_prompts={"prompt_too_long": too_long} if too_long else {},
        )

    # -- weights -----------------------------------------------------------------------------
    def _engine_syncs_itself(self) -> bool:
        """A multi-process engine (vLLM with tensor parallel workers) joins the sync group from
        its own worker processes, one rank each; an in-process engine is fed by this actor."""
        return hasattr(self.engine, "receive_weights") and not getattr(self.engine, "in_process", True)

    def sync_ranks(self) -> int:
        """How many ranks of the weight-sync group this worker takes."""
        return int(getattr(self.engine, "tensor_parallel_size", 1)) if self._engine_syncs_itself() else 1

    def join_sync_group(self, info, rank: int) -> bool:
        if self._engine_syncs_itself():
            self.engine.join_sync_group(info, rank)
            self.sync_group = "engine"
            return True
        from ..cluster.weight_sync import SyncGroup

        self.sync_group = SyncGroup(info, rank)
        return True

    def leave_sync_group(self) -> None:
        if self.sync_group == "engine":
            self.engine.leave_sync_group()
        elif self.sync_group is not None:
            self.sync_group.close()
        self.sync_group = None

    def receive_weights(self, plan) -> dict[str, Any]:
        """Join the broadcast of ``plan`` and load each bucket into the engine as it arrives."""
        from ..cluster.weight_sync import receive_weights

        if self.sync_group is None:
            raise RuntimeError(f"rollout worker {self.worker_id} has not joined the weight-sync group")
        t0 = time.perf_counter()
        if self.sync_group == "engine":
            r = self.engine.receive_weights(plan)
            return {"worker": self.worker_id, "version": self.engine.weights_version, "num_tensors": r["num_tensors"],
                    "checksums": r["checksums"], "seconds": time.perf_counter() - t0}
        checksums: list[str] = []
        n = self.engine.load_weights(receive_weights(self.sync_group, plan, checksums), plan.version)
        return {"worker": self.worker_id, "version": self.engine.weights_version, "num_tensors": n,
                "checksums": checksums, "seconds": time.perf_counter() - t0}

    def load_weights(self, weights: Sequence[tuple[str, torch.Tensor]], version: int) -> int:
        return self.engine.load_weights(weights, version)

    def weights_checksum(self, names: Optional[Sequence[str]] = None) -> dict[str, str]:
        fn = getattr(self.engine, "weights_checksum", None)
        if fn is None:
            raise NotImplementedError(f"{type(self.engine).__name__} cannot report weight checksums")
        return fn(names)

    def version(self) -> int:
        return self.engine.weights_version

    def health(self) -> dict[str, Any]:
        from ..cluster.weight_sync import get_node_ip

        return {"worker": self.worker_id, "pid": os.getpid(), "version": self.engine.weights_version,
                "engine": type(self.engine).__name__, "node_ip": get_node_ip()}
