"""The frozen reference policy for the KL term (only built when ``beta > 0``)."""
from __future__ import annotations

import torch

from ..modules import resolve_module
from ..modules.loading import ModelConfig, load_model_and_processor


def load_reference_model(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """A frozen copy of the initial policy in eval mode: ``(model, module)``.

    Loaded from ``model_cfg.path`` through its own module instance (modules hold per-model state)
    with ``post_model_init`` called, exactly like the policy. No gradients, no optimizer state."""
    module = resolve_module(model_cfg.path, model_cfg.module)
    model, _ = load_model_and_processor(model_cfg.path, module, dtype, model_cfg.processing_kwargs,
                                        model_cfg.init_kwargs)
    model.requires_grad_(False).eval()
    model.config.use_cache = False
    return model.to(device), module


def wrap_reference_zero3(model: torch.nn.Module, micro_batch_size: int, world_size: int, dtype: torch.dtype):
    """Partition the reference model's parameters with DeepSpeed ZeRO-3 (no optimizer), so that
    under ``zero_stage=3`` it costs 1/world of its size per rank like the policy. Forward passes
    are collective (every rank must run the same number)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": micro_batch_size, "train_batch_size": micro_batch_size * world_size,
              "gradient_accumulation_steps": 1, "steps_per_print": 10**9, "wall_clock_breakdown": False,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000},
              "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


class AdapterDisabled:
    """A LoRA policy's reference: the policy with its adapter off, i.e. the base model, no second copy (as TRL)."""

    def __init__(self, peft_model) -> None:
        self.peft_model, self.module = peft_model, peft_model.get_base_model()  # ``module``: forward's signature

    def __call__(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.module(**kwargs)
