"""The tiny model's format warm-up teaches the answer format and nothing of the task: after it, the
first answer token is one of the answers and the next is EOS, with the same distribution whatever
the image (so a run starts at chance and GRPO must teach it to look). Before it, neither holds."""
from __future__ import annotations

import random
import shutil

import torch
from PIL import Image

from vlgrpo.modules.registry import resolve_module
from vlgrpo.modules.tiny import warm_up_format

ANSWERS = ["red", "green", "blue", "yellow"]
RGB = {"red": (230, 25, 25), "green": (30, 170, 40), "blue": (30, 60, 230), "yellow": (240, 210, 20)}
QUESTION = "What colour is the shape? Answer with one word: red, green, blue or yellow."


def conversation():
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def first_tokens(path, module, colour):
    """(p(first token = each answer), p(EOS after the answer)) for a solid ``colour`` image."""
    processor = module.get_processing_class().from_pretrained(path)
    model = module.get_model_class(str(path), {}).from_pretrained(path)
    tok = module.tokenizer(processor)
    prompt = module.prepare_prompt(processor, [{"prompt": conversation()}])[0]
    ids = [tok.convert_tokens_to_ids(tok.tokenize(a)[0]) for a in ANSWERS]
    assert all(len(tok.tokenize(a)) == 1 for a in ANSWERS)
    image = [[Image.new("RGB", (56, 56), RGB[colour])]]
    with torch.no_grad():
        p = model(**module.prepare_model_inputs(processor, [prompt], image)).logits[0, -1].softmax(-1)
        x = module.prepare_model_inputs(processor, [prompt + colour], image)
        p_eos = model(**x).logits[0, -1].softmax(-1)[tok.convert_tokens_to_ids(tok.eos_token)]
    return p[ids], float(p_eos)


def test_warm_up_teaches_the_format_not_the_task(tiny_model_factory, tmp_path):
    path = shutil.copytree(tiny_model_factory("qwen2-vl", size="micro"), tmp_path / "model")
    module = resolve_module(str(path), "auto")
    before, eos_before = first_tokens(path, module, "red")
    assert before.sum() < 0.2 and eos_before < 0.2  # a random model does not answer in format

    rng = random.Random(0)
    colours = [rng.choice(ANSWERS) for _ in range(64)]
    images = [[Image.new("RGB", (56, 56), RGB[c])] for c in colours]
    loss = warm_up_format(path, module, [conversation()] * 64, images, colours, steps=100, seed=0)
    assert loss < 1.0  # ~ln(4)/2: uniform over the 4 answers, then a sure EOS

    dists = {c: first_tokens(path, module, c) for c in ANSWERS}
    for c, (p, p_eos) in dists.items():
        assert p.sum() > 0.8 and p_eos > 0.8, (c, p, p_eos)  # one answer word, then stop
        assert p.min() > 0.1, (c, p)  # every answer is still likely: nothing collapsed
    # the same distribution whatever the image: at chance, the task is left to GRPO
    tv = max(float((dists[a][0] - dists[b][0]).abs().sum() / 2) for a in ANSWERS for b in ANSWERS)
    assert tv < 0.1, {c: d[0] for c, d in dists.items()}
