"""Loading a policy (model + processor) through a VLM module: the one path used by rollout engines,
learners and the reference model, for hub ids and local checkpoints alike."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch


@dataclass
class ModelConfig:
    """The ``model`` section of the run config: which checkpoint, through which VLM module."""

    path: str = ""  # HF checkpoint dir or hub id; empty = build a tiny model (demo/tests), resolved at start
    module: str = "auto"  # VLM module key, 'package.module:Class', or auto (from config.json model_type)
    tiny_family: str = "qwen2-vl"  # used when path is empty
    tiny_size: str = "tiny"
    tiny_tied: bool = False  # tie lm_head to the input embeddings (as Qwen2.5-VL-3B does)
    tiny_warmup_steps: int = 100  # a freshly built tiny model learns the answer format (not the task) first
    processing_kwargs: dict = field(default_factory=dict)  # e.g. {max_pixels: 401408}
    init_kwargs: dict = field(default_factory=dict)  # extra from_pretrained kwargs (e.g. attn_implementation)


def read_model_config(model_id: str) -> dict[str, Any]:
    """``config.json`` of a local directory or a hub id (hub only when reachable)."""
    path = Path(model_id)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{model_id} has no config.json: is it a Hugging Face model directory?")
        return json.loads(cfg.read_text())
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_id).to_dict()
    except OSError as e:  # no such repo, or no network and not in the local cache
        raise ValueError(f"model {model_id!r} is not a local directory and could not be read from the Hugging Face "
                         f"Hub ({str(e).splitlines()[0][:160]}); download it where the hub is reachable "
                         f"(huggingface-cli download {model_id} --local-dir DIR) and set model.path=DIR") from None


def load_processor(model_id: str, module, processing_kwargs: Optional[dict[str, Any]] = None):
    processor = module.get_processing_class().from_pretrained(model_id)
    if processing_kwargs:
        module.apply_processing_kwargs(processor, processing_kwargs)
    return processor


def load_model_and_processor(model_id: str, module, dtype: torch.dtype | str = torch.float32,
                             processing_kwargs: Optional[dict[str, Any]] = None,
                             model_init_kwargs: Optional[dict[str, Any]] = None):
    """Load ``model_id`` with the module's model and processing classes and call
    ``post_model_init``. Returns ``(model, processor)``; the model is in eval mode on the CPU."""
    init = {"dtype": dtype, **(model_init_kwargs or {})}
    model_cls = module.get_model_class(model_id, init)
    model = model_cls.from_pretrained(model_id, **init)
    processor = load_processor(model_id, module, processing_kwargs)
    module.post_model_init(model, processor)
    model.eval()
    return model, processor


def checkpoint_name_map(model: torch.nn.Module) -> Optional[dict[str, str]]:
    """``{in-memory name: checkpoint name}`` for every tensor ``save_pretrained`` writes, in save order (tied
    duplicates dropped, transformers' renamings reverted, e.g. Qwen2-VL's ``model.language_model.layers.0...`` ->
    ``model.layers.0...``); None when the model's conversions are not pure renamings (tensors would be merged or
    split on save): the caller then converts whole state dicts."""
    params = dict(model.named_parameters(remove_duplicate=False))
    persistent_buffers = {f"{mod_name}.{b_name}" if mod_name else b_name: b
                          for mod_name, mod in model.named_modules(remove_duplicate=False)
                          for b_name, b in mod.named_buffers(recurse=False)
                          if b is not None and b_name not in mod._non_persistent_buffers_set}
    sd = {name: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")
          for name, t in {**params, **persistent_buffers}.items()}
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        sd = remove_tied_weights_from_state_dict(sd, model)
    except Exception as e:  # pragma: no cover - non-HF model or older transformers
        warnings.warn(f"could not drop tied weights with transformers ({e}); keeping all names")
    ids = {id(t): name for name, t in sd.items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: checkpoint names are the in-memory names
        return {name: name for name in sd}
    out = {ids.get(id(t)): ck_name for ck_name, t in revert_weight_conversion(model, dict(sd)).items()}
    return out if None not in out and len(out) == len(sd) else None
