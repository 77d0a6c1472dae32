"""The rollout worker: one generation engine + the reward functions (the cluster runs it as a Ray
actor). It turns prompts (``Sample``s with PIL images) into a scored, tensorised ``RolloutBatch``
and loads new weights into its engine in place (``load_weights``)."""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from ..modules import resolve_module
from ..modules.loading import ModelConfig, read_model_config
from .engine import GenerationEngine
from .hf_engine import TransformersEngine
from .rewards import RewardSet
from .types import RolloutBatch, Sample, SamplingConfig
from .vllm_engine import VLLMEngine  # imports vllm only when an engine is built


@dataclass
class RolloutConfig:
    """The ``rollout`` section of the run config: the engine, sampling, rewards and placement of
    the rollout workers."""

    engine: str = "auto"  # auto | vllm | transformers
    num_workers: int = 2
    gpus_per_worker: float = -1  # -1: tensor_parallel_size GPUs per worker when the cluster has GPUs, else 0
    cpus_per_worker: float = 1
    tensor_parallel_size: int = 1
    colocate: bool = False  # on GPUs: worker i shares learner rank i's GPU (TP 1, num_workers <= learner.num_ranks)
    per_request_seed: Optional[bool] = None  # vLLM: seed every request (exact retries, slower); None: on CPU only
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 2048  # prompt + completion tokens; longer prompts are skipped and counted
    enforce_eager: bool = False
    num_threads: Optional[int] = None  # torch threads per worker; None: its share of the node (see learner's)
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 4  # the embedded demo's answers are one word; set it for your task
    rewards: list = field(default_factory=lambda: [{"name": "accuracy", "weight": 1.0}])


def resolve_engine_name(name: str) -> str:
    """``auto``: vLLM where it is installed and there is a GPU, else transformers."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise ValueError("rollout.engine=vllm but vllm is not installed here: pip install 'vlgrpo[vllm]' "
                         "(GPU; on CPU see .ci/setup_vllm_cpu.sh), or set rollout.engine=auto")
    return name if name != "auto" else ("vllm" if has_vllm and torch.cuda.is_available() else "transformers")


def make_engine(cfg: RolloutConfig, model: ModelConfig, seed: int = 0,
                extra_engine_kwargs: Optional[dict[str, Any]] = None) -> GenerationEngine:
    module = resolve_module(model.path, model.module)
    if resolve_engine_name(cfg.engine) == "vllm":
        return VLLMEngine(model.path, module, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                          enforce_eager=cfg.enforce_eager, seed=seed, processing_kwargs=model.processing_kwargs,
                          extra_engine_kwargs=extra_engine_kwargs, per_request_seed=cfg.per_request_seed)
    gpu = torch.cuda.is_available()
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else torch.bfloat16 if gpu else torch.float32
    return TransformersEngine(model.path, module, dtype=dtype, device="cuda" if gpu else "cpu",
                              processing_kwargs=model.processing_kwargs, init_kwargs=model.init_kwargs)


class RolloutWorker:
    """A generation engine and the reward functions; the cluster runs it as a Ray actor."""

    def __init__(self, cfg: RolloutConfig, model: ModelConfig, worker_id: int = 0, seed: int = 0,
                 extra_engine_kwargs: Optional[dict[str, Any]] = None) -> None:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(seed)  # sampling of the transformers engine is reproducible per worker
        self.worker_id = worker_id
        self.engine = make_engine(cfg, model, seed, extra_engine_kwargs)
        self.rewards = RewardSet(list(cfg.rewards))
        tok = self.engine.tokenizer()
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.module, self.processor = self.engine.module, self.engine.processor  # for the prompt-length check
        text_cfg = read_model_config(model.path)
        text_cfg = text_cfg.get("text_config", text_cfg) or text_cfg
        # the engine's own limit (vLLM rejects a whole generate call with one longer prompt), else the model's
        self.context_len = getattr(self.engine, "max_model_len", None) or min(
            int(text_cfg.get("max_position_embeddings") or cfg.max_model_len), cfg.max_model_len)

    def _prompt_fits(self, samples: Sequence[Sample], sampling: SamplingConfig) -> tuple[list, list[str], list]:
        """Split off prompts (text + image tokens) that leave no room for ``max_tokens`` in the engine's context
        (``rollout.max_model_len``, at most the model's positions); the model inputs of those kept, for the engine."""
        limit = self.context_len - sampling.max_tokens
        texts = self.module.prepare_prompt(self.processor, [{"prompt": s.prompt} for s in samples])
        keep, skipped, kept_inputs = [], [], []
        patch = getattr(getattr(self.processor, "image_processor", None), "patch_size", None)
        for s, text in zip(samples, texts):
            inputs = self.module.prepare_model_inputs(self.processor, [text], [s.images])
            if s.images and patch and "image_grid_thw" in inputs:  # the first image's model-input (w, h), for `iou`
                _, h, w = inputs["image_grid_thw"][0].tolist()
                s.meta["input_size"] = (w * patch, h * patch)
            fits = inputs["input_ids"].shape[1] <= limit
            (keep if fits else skipped).append(s)
            kept_inputs += [inputs] * fits
        return keep, [s.sample_id for s in skipped], kept_inputs

    # -- generation --------------------------------------------------------------------------
    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig) -> RolloutBatch:
        t0 = time.perf_counter()
        version = self.engine.weights_version
        samples, too_long, inputs = self._prompt_fits(samples, sampling)  # the processor runs once a prompt here
        results = self.engine.generate(samples, sampling, inputs) if samples else []
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
            sample_ids=[s.sample_id for s in samples], prompts_text=[r.prompt_text for r in results],
            images=[[] for _ in samples], completion_ids=ids, completion_mask=mask,  # the caller has the images
            sampling_logprobs=logps, rewards=scores, reward_names=list(names), reward_weights=list(weights),
            completions_text=[c.text for c in comps], finish_reasons=[c.finish_reason for c in comps],
            weights_version=version, group_size=sampling.n,
            timings={"generate_s": t1 - t0, "reward_s": t2 - t1, "worker": float(self.worker_id),
                     "completion_tokens": float(sum(lengths))},
            reward_errors=dict(errors), pad_token_id=self.pad_id,
            skipped_prompts={"prompt_too_long": too_long} if too_long else {})

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        """Copy ``(checkpoint name, tensor)`` pairs into the engine; it now holds ``version``."""
        return self.engine.load_weights(weights, version)

    def weights_checksum(self, names: Optional[Sequence[str]] = None) -> dict[str, Optional[str]]:
        return self.engine.weights_checksum(names)

    def health(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "pid": os.getpid(), "version": self.engine.weights_version,
                "engine": type(self.engine).__name__}
