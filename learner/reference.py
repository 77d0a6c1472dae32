"""The frozen reference policy for the KL term (only built when ``beta > 0``)."""
from __future__ import annotations

from typing import Any

import torch


def load_reference_model(cfg: Any, device: torch.device, dtype: torch.dtype):
    """A frozen copy of the initial policy in eval mode: ``(model, module)``.

    Loaded from ``cfg.model_path`` through its own module instance (modules hold per-model state)
    with ``post_model_init`` called, exactly like the policy. No gradients, no optimizer state."""
    from vlgrpo.modules import resolve_module
    from vlgrpo.modules.loading import load_model_and_processor

    module = resolve_module(cfg.model_path, cfg.module)
    model, _ = load_model_and_processor(
        cfg.model_path, module, dtype=dtype, processing_kwargs=cfg.processing_kwargs or None,
        model_init_kwargs=cfg.model_init_kwargs or None,
    )
    model.requires_grad_(False)
    model.eval()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model.to(device), module


def wrap_reference_zero3(model: torch.nn.Module, micro_batch_size: int, world_size: int,
                         dtype: torch.dtype):
    """Partition the reference model's parameters with DeepSpeed ZeRO-3 (no optimizer), so that
    under ``zero_stage=3`` it costs 1/world of its size per rank like the policy. Forward passes
    are collective (every rank must run the same number)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10_000},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
