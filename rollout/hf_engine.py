"""The transformers ``generate`` engine: the CPU default and the fallback where vLLM is absent.

Same contract as the vLLM engine: prompts rendered with the module's ``prepare_prompt``, inputs
built with ``prepare_model_inputs`` minus ``get_non_generate_params``; log-probs of the sampled
tokens are ``log_softmax(logits / temperature)`` over the vocabulary without the vision
placeholder tokens (which are never sampled), before top-p/top-k: what the learner computes too.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..modules.base import VLMModule
from ..modules.loading import checkpoint_name_map, load_model_and_processor
from .engine import GenerationEngine, tensor_checksum
from .types import Completion, GenerationResult, Sample, SamplingConfig


class TransformersEngine(GenerationEngine):
    def __init__(self, model_path: str, module: VLMModule, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 processing_kwargs: Optional[dict] = None, init_kwargs: Optional[dict] = None,
                 max_batch_size: int = 64) -> None:
        self.module = module
        self.device = torch.device(device)
        # ``init_kwargs``: extra ``from_pretrained`` kwargs (``model.init_kwargs``), as the learner gets them
        self.model, self.processor = load_model_and_processor(model_path, module, dtype, processing_kwargs,
                                                              init_kwargs)
        self.model.to(self.device)
        # Weights arrive under checkpoint (HF state_dict on disk) names, which transformers may
        # rename in memory (e.g. Qwen2-VL's model.layers.* -> model.language_model.layers.*).
        self._mem_name = {ck: mem for mem, ck in (checkpoint_name_map(self.model) or {}).items()}
        self.max_batch_size = max_batch_size
        self.weights_version = 0
        tok = self.tokenizer()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = ([eos] if isinstance(eos, int) else list(eos or [])) or [tok.eos_token_id]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        self.suppress_ids = module.vision_token_ids(self.processor)

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig) -> list[GenerationResult]:
        texts = self.module.prepare_prompt(self.processor, [{"prompt": s.prompt} for s in samples])
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # Each prompt is repeated n times as its own row: robust for every family's image layout.
        rows = [(i, texts[i], samples[i].images) for i in range(len(samples)) for _ in range(sampling.n)]
        completions: list[list[Completion]] = [[] for _ in samples]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            for (i, _, _), comp in zip(chunk, self._generate_rows(chunk, sampling)):
                completions[i].append(comp)
        return [GenerationResult(prompt_text=t, completions=c) for t, c in zip(texts, completions)]

    def _generate_rows(self, rows, sampling: SamplingConfig) -> list[Completion]:
        inputs = self.module.prepare_model_inputs(self.processor, [r[1] for r in rows], [r[2] for r in rows])
        inputs = {k: v.to(self.device) for k, v in self.module.generate_inputs(inputs).items()}
        greedy = sampling.temperature <= 0
        out = self.model.generate(**inputs, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                                  temperature=None if greedy else sampling.temperature,
                                  top_p=None if greedy else sampling.top_p,
                                  top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
                                  eos_token_id=self.eos_ids, suppress_tokens=self.suppress_ids or None,
                                  pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True)
        prompt_len = inputs["input_ids"].shape[1]
        seqs = out.sequences[:, prompt_len:]
        logits = torch.stack(out.logits, dim=1).float()  # [B, T, V] raw logits
        if not greedy:
            logits = logits / sampling.temperature
        if self.suppress_ids:  # the distribution actually sampled from: vision tokens removed
            logits[..., self.suppress_ids] = float("-inf")
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
        tok = self.tokenizer()
        result = []
        for row_ids, row_lp in zip(seqs.tolist(), logprobs.tolist()):
            end = next((j + 1 for j, t in enumerate(row_ids) if t in self.eos_ids), None)
            ids = row_ids[:end] if end else row_ids
            result.append(Completion(ids, row_lp[:len(ids)], tok.decode(ids, skip_special_tokens=True),
                                     "stop" if end else "length"))
        return result

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        state = self.model.state_dict(keep_vars=True)
        n = 0
        for sent_name, tensor in weights:
            name = self._mem_name.get(sent_name, sent_name)
            if name not in state:
                raise KeyError(f"weight {sent_name!r} is not a parameter of the rollout model")
            target = state[name]
            if target.shape != tensor.shape:
                raise ValueError(f"weight {sent_name!r}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.data.copy_(tensor)
            n += 1
        self.weights_version = version
        return n

    def weights_checksum(self, names: Optional[Sequence[str]] = None) -> dict[str, str]:
        """Checksums keyed by checkpoint name (the names weights are synced under)."""
        state = self.model.state_dict()
        names = list(names) if names is not None else list(self._mem_name) or list(state)
        return {n: tensor_checksum(state[self._mem_name.get(n, n)]) for n in names}
