"""Every family: prompt -> inputs -> forward / backward / generate, through the VLM module."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlgrpo.modules import Video, resolve_module
from vlgrpo.modules.loading import load_model_and_processor

from ..conftest import FAMILIES


def _example(n_images: int, question: str) -> dict:
    return {"prompt": [{"role": "user", "content": [{"type": "image"}] * n_images
                        + [{"type": "text", "text": question}]}]}


IMAGE_SETS = {
    "one_square": [[Image.new("RGB", (56, 56), "red")], [Image.new("RGB", (56, 56), "blue")]],
    "sizes_and_two": [[Image.new("RGB", (90, 40), "green")],
                      [Image.new("RGB", (40, 120), "yellow"), Image.new("RGB", (64, 64), "red")]],
}


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tiny_model_factory):
    path = tiny_model_factory(request.param)
    module = resolve_module(str(path))
    model, processor = load_model_and_processor(str(path), module)
    return request.param, module, model, processor


def _inputs(module, processor, image_set):
    images = IMAGE_SETS[image_set]
    examples = [_example(len(ims), "What colour is the shape?") for ims in images]
    texts = module.prepare_prompt(processor, examples)
    return module.prepare_model_inputs(processor, texts, images)


@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_inputs_forward_backward(loaded, image_set):
    family, module, model, processor = loaded
    inputs = _inputs(module, processor, image_set)
    video_keys = {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}  # only with a video
    assert set(inputs) == {"input_ids", "attention_mask", *module.get_custom_multimodal_keywords()} - video_keys
    # left padding: the last column is real for every prompt
    assert bool(inputs["attention_mask"][:, -1].all())
    model.train()
    model.zero_grad()
    out = model(**inputs)
    model.eval()
    b, seq = inputs["input_ids"].shape
    assert out.logits.shape == (b, seq, model.config.get_text_config().vocab_size)
    assert torch.isfinite(out.logits).all()
    out.logits.float().logsumexp(-1).mean().backward()
    vision_kw = module.get_vision_modules_keywords()
    grads = {n: p.grad for n, p in model.named_parameters()}
    vision = [n for n in grads if any(k in n for k in vision_kw)]
    language = [n for n in grads if "language_model" in n]
    assert vision and language
    assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in vision), "no gradient reached vision"
    assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in language)


def test_prompts_processed_one_by_one_and_joined_equal_the_processor_batch(loaded):
    """``collate_inputs`` (how the rollout worker hands its length check's inputs to the engine) gives, tensor for
    tensor, what the processor gives for the whole batch: a text-only prompt, images of different sizes, two in
    one prompt and (Qwen2/2.5-VL) a video."""
    family, module, _, processor = loaded
    visuals, examples = [*IMAGE_SETS["sizes_and_two"], []], []
    if family in ("qwen2-vl", "qwen2.5-vl"):
        visuals.append([Video([Image.new("RGB", (56, 56), c) for c in ("red", "blue", "red", "blue")], fps=2)])
    for v in visuals:
        examples.append(_example(len(v), "What colour is the shape?"))
        if any(isinstance(x, Video) for x in v):
            examples[-1]["prompt"][0]["content"][0] = {"type": "video"}
    texts = module.prepare_prompt(processor, examples)
    batch = module.prepare_model_inputs(processor, texts, visuals)
    joined = module.collate_inputs([module.prepare_model_inputs(processor, [t], [v]) for t, v in zip(texts, visuals)],
                                   module.tokenizer(processor).pad_token_id)
    assert set(joined) == set(batch) and "pixel_values" in batch
    for key in batch:
        assert torch.equal(joined[key], batch[key]), key


def test_generate_without_non_generate_params(loaded):
    family, module, model, processor = loaded
    inputs = _inputs(module, processor, "sizes_and_two")
    gen_inputs = module.generate_inputs(inputs)
    assert not set(module.get_non_generate_params()) & set(gen_inputs)
    torch.manual_seed(0)
    out = model.generate(**gen_inputs, max_new_tokens=4, do_sample=True)
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert out.shape[1] > inputs["input_ids"].shape[1]
    if module.get_non_generate_params():
        with pytest.raises(ValueError, match="not used by the model"):
            model.generate(**inputs, max_new_tokens=2)


def test_internvl_image_flags_drop_padding_tiles(tiny_model_factory):
    """image_flags == 0 marks padding tiles: the forward must ignore them (VLM-R1 semantics)."""
    path = tiny_model_factory("internvl")
    module = resolve_module(str(path))
    model, processor = load_model_and_processor(str(path), module)
    texts = module.prepare_prompt(processor, [_example(1, "hi")])
    inputs = module.prepare_model_inputs(processor, texts, [[Image.new("RGB", (56, 56), "red")]])
    ref = model(**inputs).logits
    padded = dict(inputs)
    padded["pixel_values"] = torch.cat([inputs["pixel_values"], torch.randn_like(inputs["pixel_values"])])
    padded["image_flags"] = torch.cat([inputs["image_flags"], torch.zeros_like(inputs["image_flags"])])
    torch.testing.assert_close(model(**padded).logits, ref)


def test_save_load_round_trip_identical_logits(loaded, tmp_path):
    family, module, model, processor = loaded
    inputs = _inputs(module, processor, "one_square")
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    module2 = resolve_module(str(tmp_path))
    model2, processor2 = load_model_and_processor(str(tmp_path), module2)
    inputs2 = _inputs(module2, processor2, "one_square")
    for k in inputs:
        torch.testing.assert_close(inputs[k], inputs2[k])
    with torch.no_grad():
        after = model2(**inputs2).logits
    assert torch.equal(before, after)


def test_tiny_models_are_seeded_and_small(tiny_model_factory, tmp_path):
    from vlgrpo.modules.tiny import build_tiny_model
    from safetensors.torch import load_file

    a = load_file(str(tiny_model_factory("qwen2-vl") / "model.safetensors"))
    b = load_file(str(build_tiny_model("qwen2-vl", tmp_path / "again") / "model.safetensors"))
    c = load_file(str(build_tiny_model("qwen2-vl", tmp_path / "other", seed=1) / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    n = sum(t.numel() for t in a.values())
    assert 1e5 < n < 1e7


def test_task_words_are_single_tokens(loaded):
    _, module, _, processor = loaded
    tok = module.tokenizer(processor)
    for word in ["red", "green", "blue", "yellow"]:
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("<answer>", add_special_tokens=False)["input_ids"]) == 1
