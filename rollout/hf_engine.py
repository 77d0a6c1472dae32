"""The transformers engine: the CPU default and the fallback where vLLM is absent.

Same contract as the vLLM engine: prompts rendered with the module's ``prepare_prompt``, inputs
built with ``prepare_model_inputs`` minus ``get_non_generate_params``; log-probs of the sampled
tokens are ``log_softmax(logits / temperature)`` over the vocabulary without the vision
placeholder tokens (which are never sampled), before top-p/top-k: what the learner computes too.
With a ``supports_shared_prefix`` module each prompt is processed and prefilled once and its G rows
are sampled over copies of its KV cache (our decoding loop); otherwise each row is a ``generate`` row.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

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
    def generate(self, samples: Sequence[Sample], sampling: SamplingConfig,
                 prompt_inputs: Optional[Sequence[dict]] = None) -> list[GenerationResult]:
        texts = self.module.prepare_prompt(self.processor, [{"prompt": s.prompt} for s in samples])
        pre = list(prompt_inputs or [None] * len(samples))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        # Shared prefix: chunks of whole groups, each prompt once; else each prompt repeated n times as its own
        # ``generate`` row (robust for every family's image layout).
        rows, shared = [i for i in range(len(samples)) for _ in range(sampling.n)], self.module.supports_shared_prefix
        step = sampling.n * max(1, self.max_batch_size // sampling.n) if shared else self.max_batch_size
        completions: list[list[Completion]] = [[] for _ in samples]
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            run = self._decode_shared if shared else self._generate_rows
            outs = run([texts[i] for i in chunk], [samples[i].images for i in chunk], [pre[i] for i in chunk], sampling)
            for i, comp in zip(chunk, self._completions(*outs)):
                completions[i].append(comp)
        return [GenerationResult(prompt_text=t, completions=c) for t, c in zip(texts, completions)]

    def _scores(self, logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """The distribution sampled from: ``logits / temperature`` (raw when greedy), vision tokens removed."""
        scores = logits.float() / (sampling.temperature if sampling.temperature > 0 else 1.0)
        scores[..., self.suppress_ids] = float("-inf")
        return scores

    def _inputs(self, texts, images, pre) -> dict[str, torch.Tensor]:
        """Model inputs of these prompts: the caller's per-prompt ones joined, else the processor's."""
        inputs = self.module.collate_inputs(pre, self.tokenizer().pad_token_id) if all(p is not None for p in pre) \
            else self.module.prepare_model_inputs(self.processor, texts, images)
        return {k: v.to(self.device) for k, v in self.module.generate_inputs(inputs).items()}

    def _generate_rows(self, texts, images, pre, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self._inputs(texts, images, pre)
        greedy = sampling.temperature <= 0
        out = self.model.generate(**inputs, max_new_tokens=sampling.max_tokens, do_sample=not greedy,
                                  temperature=None if greedy else sampling.temperature,
                                  top_p=None if greedy else sampling.top_p,
                                  top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
                                  eos_token_id=self.eos_ids, suppress_tokens=self.suppress_ids or None,
                                  pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True)
        seqs = out.sequences[:, inputs["input_ids"].shape[1]:]
        logprobs = torch.log_softmax(self._scores(torch.stack(out.logits, dim=1), sampling), dim=-1)
        return seqs, logprobs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)

    def _decode_shared(self, texts, images, pre, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole groups: each prompt processed and run once, its ``n`` rows sampled token by token over copies of
        its cache (``generate`` cannot continue from an expanded cache for Qwen or InternVL), at the learner's
        positions (``completion_position_ids``)."""
        inputs = self._inputs(texts[::sampling.n], images[::sampling.n], pre[::sampling.n])
        rows = torch.arange(len(texts) // sampling.n, device=self.device).repeat_interleave(sampling.n)
        logits, kwargs = self.module.prefill_shared(self.model, inputs, rows)
        pos = self.module.completion_position_ids(self.model, inputs, rows, sampling.max_tokens)
        mask, greedy = inputs["attention_mask"].index_select(0, rows), sampling.temperature <= 0
        warpers = [] if greedy else ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k > 0 else []) + (
            [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else [])
        eos, done, tokens, logps = torch.tensor(self.eos_ids, device=self.device), rows < 0, [], []
        for t in range(sampling.max_tokens):
            scores = self._scores(logits[:, -1], sampling)
            logps.append(torch.log_softmax(scores, -1))
            for warp in warpers:
                scores = warp(None, scores)
            tok = scores.argmax(-1) if greedy else torch.multinomial(scores.softmax(-1), 1).squeeze(1)
            logps[-1] = logps[-1].gather(-1, tok[:, None]).squeeze(1)
            tokens.append(torch.where(done, self.pad_id, tok))
            done = done | torch.isin(tok, eos)
            if bool(done.all()) or t + 1 == sampling.max_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step = {"position_ids": pos[..., t:t + 1]} if pos is not None else {}  # token t, fed back
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, **kwargs, **step).logits
        return torch.stack(tokens, 1), torch.stack(logps, 1)

    def _completions(self, seqs: torch.Tensor, logprobs: torch.Tensor) -> list[Completion]:
        """Rows of sampled tokens (cut after the first EOS) and their log-probs."""
        result, tok = [], self.tokenizer()
        for ids, lps in zip(seqs.tolist(), logprobs.tolist()):
            end = next((j + 1 for j, x in enumerate(ids) if x in self.eos_ids), None)
            ids = ids[:end] if end else ids
            result.append(Completion(ids, lps[:len(ids)], tok.decode(ids, skip_special_tokens=True),
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
