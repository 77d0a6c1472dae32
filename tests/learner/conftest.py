"""Shared fixtures of the learner tests: tiny random VLM checkpoints and a fixed batch."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

FAMILY_MODULE = {"qwen2-vl": "qwen", "internvl": "internvl"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``{family: checkpoint dir}`` of micro-sized random models (each built once per session)."""
    from vlgrpo.modules.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")

    class Lazy(dict):  # built on first use: a test file needing one family builds only that one
        def __missing__(self, fam):
            self[fam] = str(build_tiny_model(fam, root / fam, seed=0, size="micro"))
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
