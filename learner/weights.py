"""A learner rank's weights and state, mixed into ``rank.Learner``: names, full tensors (gathered under
ZeRO-3; LoRA merged), checkpoints and the Hugging Face policy. Knows nothing of weight sync, only what a
sender needs: ``named_weights`` (the tensors, in order) and ``weights_meta`` (their specs). Collective
(on *every* rank at once): ``named_weights`` (iterated to the end), ``save/load_checkpoint``, ``save_pretrained``.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .lora import lora_layers, merged

_CKPT_FILE = "learner_state.pt"


class LearnerWeights:
    """Expects ``model``, ``engine`` (DeepSpeed or None), ``optimizer``, ``scheduler``, ``cfg``, ``rank``,
    ``processor``, ``global_step``, ``_name_map``, ``_barrier``, ``peft_model`` (LoRA, or None) from the learner."""

    def _ck(self, name: str) -> str:
        return self._name_map.get(name, name) if self._name_map else name

    def trainable_names(self) -> list[str]:
        """Checkpoint (HF state_dict) names of the tensors training changes (LoRA: the adapted weights)."""
        if self.peft_model is not None:
            return [self._ck(n) for n in lora_layers(self.model)]
        return [self._ck(n) for n, p in self.model.named_parameters() if p.requires_grad]

    def _export_items(self) -> list[tuple[str, torch.Tensor]]:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        names = list(self._name_map) if self._name_map else list(params)
        return [(n, params[n] if n in params else self.model.get_buffer(n)) for n in names]

    def named_weights(self, bucket_numel: int = 50_000_000, device: Optional[str] = None, all_ranks: bool = False,
                      names: Optional[Collection[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights as ``(checkpoint name, tensor)``, names as in the HF ``state_dict`` of the
        saved checkpoint (what vLLM's ``reload_weights`` expects).

        Collective: iterate it to the end on *every* rank (ZeRO-3 gathers ``bucket_numel``
        elements at a time on all ranks). Only rank 0 yields unless ``all_ranks``. Under ZeRO-3
        each tensor is a fresh copy of one gathered parameter; otherwise it is the live parameter
        (detached, no copy): copy it if you keep it past the next ``train_step``. ``names``: only
        these checkpoint names (e.g. a sync plan's), and under ZeRO-3 only they are gathered."""
        emit = all_ranks or self.rank == 0
        if self._name_map is None:  # conversions that merge/split tensors: whole state dict
            yield from ((n, t) for n, t in self._named_weights_converted(emit, device) if names is None or n in names)
            return
        def finish(t: torch.Tensor, copy: bool) -> torch.Tensor:
            t = t.detach() if device is None else t.detach().to(device)
            return t.clone() if copy else t
        items = [(n, t) for n, t in self._export_items() if names is None or self._ck(n) in names]
        if self.cfg.zero_stage != 3:
            if emit:  # LoRA: adapted weights go out merged (new tensors)
                for n, t in merged(self.model, items):
                    yield self._ck(n), finish(t, copy=False)
            return
        import deepspeed
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for i, (n, t) in enumerate(items):
            bucket.append((n, t))
            size += int(getattr(t, "ds_numel", t.numel()))
            if size >= bucket_numel or i == len(items) - 1:
                params = [p for _, p in bucket if hasattr(p, "ds_id")]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    got = [(self._ck(b), finish(p, copy=True)) for b, p in bucket] if emit else []
                for item in got:  # (not ``yield from``: a generator driven with send() must work)
                    yield item
                bucket, size = [], 0

    def gathered_weights(self, names: Optional[Collection[str]] = None,
                         device: Optional[str] = None) -> list[tuple[str, torch.Tensor]]:
        """Collective: ``named_weights(names=, device=)`` run to the end on every rank *before*
        returning rank 0's full list (empty on the other ranks). For ZeRO-3 with several ranks: a
        sync then sends without a learner gather interleaved with its collectives, at the cost of
        one copy of the ``names`` tensors on ``device``."""
        return list(self.named_weights(device=device, names=names))

    def _named_weights_converted(self, emit: bool, device: Optional[str]):
        sd = self._gather_state_dict(emit)
        if not emit:
            return
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        sd = revert_weight_conversion(self.model, remove_tied_weights_from_state_dict(sd, self.model))
        for k, v in sd.items():
            yield k, (v.to(device) if device is not None else v)

    def _gather_state_dict(self, emit: bool) -> dict[str, torch.Tensor]:
        """In-memory names -> CPU copies (collective under ZeRO-3); empty where not ``emit``."""
        model = self.model
        if self.cfg.zero_stage != 3:
            sd = model.state_dict()
            if self.peft_model is not None:  # merged, under the base names
                sd = {n.replace(".base_layer.", "."): t for n, t in merged(model, sd.items()) if ".lora_" not in n}
            return {n: t.detach().to("cpu", copy=True) for n, t in sd.items()} if emit else {}
        import deepspeed
        sd: dict[str, torch.Tensor] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        for n in model.state_dict().keys():
            t = params.get(n)
            with deepspeed.zero.GatheredParameters([t] if t is not None and hasattr(t, "ds_id") else [],
                                                   modifier_rank=None):
                if emit:
                    sd[n] = (t if t is not None else model.get_buffer(n)).detach().to("cpu", copy=True)
        return sd

    def weights_meta(self, trainable_only: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
        """``(checkpoint name, full shape, dtype)`` of the tensors ``named_weights`` yields, in the
        same order; not collective (full shapes come from ZeRO-3 metadata, nothing is gathered).
        Models whose checkpoint conversion merges tensors are read for real (not under ZeRO-3)."""
        keep = set(self.trainable_names()) if trainable_only else None
        if self._name_map is None:
            if self.cfg.zero_stage == 3:
                raise NotImplementedError("this model's checkpoint conversion merges tensors, which weight sync "
                                          "supports only without ZeRO-3; use learner.zero_stage=2")
            meta = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                    for n, t in self.named_weights(all_ranks=True)]
        else:
            meta = [(self._ck(n), tuple(getattr(t, "ds_shape", t.shape)), str(t.dtype).removeprefix("torch."))
                    for n, t in self._export_items()]
        return [m for m in meta if keep is None or m[0] in keep]

    def movable_buffers(self) -> tuple[list[torch.Tensor], Callable[[], None]]:
        """The storage that holds this rank's trainable weights, for a caller that wants to move it
        (e.g. into shared memory), and a function re-pointing the parameters at it once moved.

        ZeRO-1/2 keep the parameters as views of one flat buffer per group (re-pointed as
        DeepSpeed's own ``reload_states`` does); stage 0: the parameters themselves. ZeRO-3 and
        optimizers without flat buffers: nothing (the weights are gathered or copied per sync)."""
        opt = self.optimizer
        if self.cfg.zero_stage == 3:
            return [], lambda: None
        if self.engine is None:  # ``tensor.data = ...`` re-points a parameter by itself
            return [p for p in self.model.parameters() if p.requires_grad and p.is_contiguous()], lambda: None
        if not all(hasattr(opt, a) for a in ("bit16_groups_flat", "parallel_partitioned_bit16_groups",
                                             "get_data_parallel_partitions", "_update_model_bit16_weights")):
            return [], lambda: None
        def repoint() -> None:
            opt.parallel_partitioned_bit16_groups[:] = [opt.get_data_parallel_partitions(flat, i)
                                                        for i, flat in enumerate(opt.bit16_groups_flat)]
            for i in range(len(opt.bit16_groups_flat)):
                opt._update_model_bit16_weights(i)
        return list(opt.bit16_groups_flat), repoint

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str) -> str:
        """Collective: everything needed to resume exactly (weights, optimizer, scheduler, step,
        RNG): DeepSpeed's own sharded format, or ``learner_state.pt`` from rank 0 at stage 0."""
        path = Path(ckpt_dir)
        path.mkdir(parents=True, exist_ok=True)
        client = {"global_step": self.global_step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if self.engine is not None:
            self.engine.save_checkpoint(str(path), tag=f"step{self.global_step}", client_state=client,
                                        exclude_frozen_parameters=self.peft_model is not None)
        else:
            if self.rank == 0:  # with LoRA: copies of the adapters only (the live ones may view shared memory)
                sd = self.model.state_dict() if self.peft_model is None else \
                    {k: v.clone() for k, v in get_peft_model_state_dict(self.peft_model).items()}
                torch.save({"model": sd, "optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict(), **client}, path / _CKPT_FILE)
            self._barrier()
        return str(path)

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Collective: restore a ``save_checkpoint`` directory. Returns the restored step."""
        path = Path(ckpt_dir)
        if self.engine is not None:
            load_path, client = self.engine.load_checkpoint(str(path), load_optimizer_states=True,
                                                            load_lr_scheduler_states=True,
                                                            load_module_strict=self.peft_model is None)
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}")
        else:  # weights_only: no unpickling of arbitrary objects
            client: Any = torch.load(path / _CKPT_FILE, map_location=self.device, weights_only=True)
            (self.model.load_state_dict(client["model"]) if self.peft_model is None
             else set_peft_model_state_dict(self.peft_model, client["model"]))
            self.optimizer.load_state_dict(client["optimizer"])
            self.scheduler.load_state_dict(client["scheduler"])
        self.global_step = int(client.get("global_step", 0))
        if "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"].cpu())
        if "python_rng" in client:
            random.setstate(client["python_rng"])
        return self.global_step

    def save_pretrained(self, out_dir: str) -> Optional[str]:
        """Collective: the current policy in Hugging Face format (model + processor) from rank 0,
        loadable by ``from_pretrained`` and vLLM (LoRA: merged; + ``adapter/``). One full CPU copy on rank 0."""
        sd = self._gather_state_dict(self.rank == 0)
        if self.rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(out_dir, state_dict=sd)
            self.processor.save_pretrained(out_dir)
            if self.peft_model is not None:
                self.peft_model.save_pretrained(str(Path(out_dir) / "adapter"))
        self._barrier()
        return out_dir if self.rank == 0 else None
