"""Shared fixtures and helpers of the learner tests: tiny random VLM checkpoints, a fixed batch,
full weights and batch log-probs of a ``Learner``, and a Ray learner group (for the distributed
tests)."""
from __future__ import annotations

import socket
import sys
from typing import Any

import pytest
import torch
from PIL import Image

FAMILY_MODULE = {"qwen2-vl": "qwen", "internvl": "internvl"}


@pytest.fixture(scope="module")
def port():
    """A free port for this process's one-rank process group (DeepSpeed or plain torch); the env vars
    the learner sets are restored and the group destroyed afterwards (later tests see neither)."""
    mp = pytest.MonkeyPatch()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        mp.setenv(k, "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    yield free
    ds = sys.modules.get("deepspeed.comm")  # DeepSpeed's teardown also drops its cached groups
    if torch.distributed.is_initialized():  # (a later module's ZeRO engine would use them: "not registered")
        (ds.destroy_process_group if ds is not None and ds.is_initialized() else torch.distributed.destroy_process_group)()
    mp.undo()


@pytest.fixture(scope="session")
def tiny_models(tiny_model_factory):
    """``{family: checkpoint dir}`` of micro-sized random models (each built once per session,
    through the session-wide ``tiny_model_factory`` of ``tests/conftest.py``)."""

    class Lazy(dict):  # built on first use: a test file needing one family builds only that one
        def __missing__(self, fam):
            self[fam] = str(tiny_model_factory(fam, size="micro"))
            return self[fam]

    return Lazy()


def make_prompts(module, processor, num_prompts: int):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    questions = ["What colour is the shape?", "Is the shape on the left or on the right?",
                 "How many shapes are in the image?", "What shape is it?"]
    examples, images = [], []
    for i in range(num_prompts):
        examples.append({"prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": questions[i % len(questions)] + " " * (i % 3)}]}]})
        # different sizes -> different numbers of image tokens -> real left padding
        images.append([Image.new("RGB", (56 + 14 * (i % 3), 56), colours[i % len(colours)])])
    texts = module.prepare_prompt(processor, examples)
    return texts, images


def make_batch(module, processor, num_prompts=2, group_size=3, max_len=7, seed=0, advantages=None):
    from vlgrpo.learner.types import TrainBatch

    texts, images = make_prompts(module, processor, num_prompts)
    g = torch.Generator().manual_seed(seed)
    n = num_prompts * group_size
    ids = torch.randint(20, 480, (n, max_len), generator=g)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    lengths[0] = max_len
    mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    pad = module.tokenizer(processor).pad_token_id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    if advantages is None:
        advantages = torch.randn(n, generator=g)
    return TrainBatch(prompts_text=texts, images=images, completion_ids=ids, completion_mask=mask,
                      advantages=torch.as_tensor(advantages, dtype=torch.float32))


# -- learner configs ------------------------------------------------------------------------------
def learner_configs(path, family: str = "qwen2-vl", **kw):
    """``(LearnerConfig, ModelConfig)`` for a tiny checkpoint: ``kw`` are ``LearnerConfig`` fields
    (derived ones like ``seed``/``total_steps``/``max_completion_length`` included)."""
    from vlgrpo.learner.types import LearnerConfig
    from vlgrpo.modules.loading import ModelConfig

    return LearnerConfig(**kw), ModelConfig(path=str(path), module=FAMILY_MODULE[family])


def make_learner(path, family: str = "qwen2-vl", **kw):
    """An in-process ``Learner`` (one rank, no Ray); plain torch unless ``zero_stage`` says otherwise."""
    from vlgrpo.learner.rank import Learner

    opts: dict[str, Any] = dict(zero_stage=0, lr=1e-3, micro_batch_size=4, seed=0, num_threads=2)
    opts.update(kw)
    return Learner(*learner_configs(path, family, **opts))


# -- what the tests read off a learner ------------------------------------------------------------
def weights(learner) -> dict[str, torch.Tensor]:
    """``{checkpoint name: CPU copy}`` of the learner's full weights (rank 0; ``named_weights``)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in learner.named_weights()}


def frozen_names(learner) -> list[str]:
    """Checkpoint names of the learner's frozen parameters (e.g. the vision tower with ``freeze_vision``)."""
    return [learner._ck(n) for n, p in learner.model.named_parameters() if not p.requires_grad]


def batch_logprobs(learner, batch, reference: bool = False) -> torch.Tensor:
    """Log-probs ``[N, T]`` (float32, CPU) of ``batch``'s completions under the learner's current
    policy (or reference model): ``micro_batches`` + ``logprobs`` per micro-batch, concatenated and
    padded with 0 to the batch's ``T`` (micro-batches cut trailing all-padding columns)."""
    n, t = batch.completion_ids.shape
    out = torch.zeros(n, t, dtype=torch.float32)
    row = 0
    with torch.no_grad():
        for mb in learner.micro_batches(batch):
            lp = learner.logprobs(mb, reference=reference).float().cpu()
            out[row:row + lp.shape[0], :lp.shape[1]] = lp
            row += lp.shape[0]
    assert row == n
    return out
