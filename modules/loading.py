"""Loading a policy (model + processor) through a VLM module: the one path used by rollout engines,
learners and the reference model, for hub ids and local checkpoints alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch


def read_model_config(model_id: str) -> dict[str, Any]:
    """``config.json`` of a local directory or a hub id (hub only when reachable)."""
    path = Path(model_id)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{model_id} has no config.json: is it a Hugging Face model directory?")
        return json.loads(cfg.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id).to_dict()


def load_processor(model_id: str, module, processing_kwargs: Optional[dict[str, Any]] = None):
    processor = module.get_processing_class().from_pretrained(model_id)
    if processing_kwargs:
        module.apply_processing_kwargs(processor, processing_kwargs)
    return processor


def load_model_and_processor(
    model_id: str,
    module,
    dtype: torch.dtype | str = torch.float32,
    processing_kwargs: Optional[dict[str, Any]] = None,
    model_init_kwargs: Optional[dict[str, Any]] = None,
):
    """Load ``model_id`` with the module's model and processing classes and call
    ``post_model_init``. Returns ``(model, processor)``; the model is in eval mode on the CPU."""
    init = {"dtype": dtype, **(model_init_kwargs or {})}
    model_cls = module.get_model_class(model_id, init)
    model = model_cls.from_pretrained(model_id, **init)
    processor = load_processor(model_id, module, processing_kwargs)
    module.post_model_init(model, processor)
    model.eval()
    return model, processor
