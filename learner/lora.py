"""LoRA on the policy (``learner.lora``) with peft, and the adapted weights merged (``W + alpha/r B A``)."""
from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer


def apply_lora(model: torch.nn.Module, cfg, module, name_map):
    """``(model, name_map, peft_model)``: LoRA on the linear layers named (or suffixed) by ``target_modules``
    outside the vision tower (``vision``: all of its too), injected into ``model``; ``name_map`` re-keyed
    (``q_proj.weight`` -> ``q_proj.base_layer.weight``). ``rank`` 0: as given, no peft model."""
    if not cfg.rank:
        return model, name_map, None
    if name_map is None:
        raise ValueError("learner.lora needs checkpoint names that are plain renamings; set learner.lora.rank=0")
    keys, where = module.get_vision_modules_keywords(), "" if cfg.vision else " outside the vision tower"
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and (cfg.vision or not any(k in n for k in keys))]
    hits = {t: [n for n in linear if n == t or n.endswith("." + t)] for t in cfg.target_modules}
    for t in [t for t, found in hits.items() if not found]:
        raise ValueError(f"learner.lora.target_modules: {t!r} matches no linear layer{where}; fix the list "
                         f"(those end in {sorted({n.rsplit('.', 1)[-1] for n in linear})})")
    chosen = {n for found in hits.values() for n in found}
    targets = [n for n in linear if n in chosen or cfg.vision and any(k in n for k in keys)]
    peft_model = get_peft_model(model, PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=targets))
    renamed = {n.replace(".base_layer.", "."): n for n in model.state_dict() if ".base_layer." in n}
    return model, {renamed.get(k, k): v for k, v in name_map.items()}, peft_model


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """``{name of the layer's base weight: LoRA layer}``."""
    return {n + ".base_layer.weight": m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged(model: torch.nn.Module, items):
    """``(name, tensor)`` of ``items``, each LoRA layer's base weight as a new tensor ``W + alpha/r B A``."""
    layers = lora_layers(model)
    yield from ((n, t + layers[n].get_delta_weight(layers[n].active_adapters[0]).to(t.dtype) if n in layers else t)
                for n, t in items)
