"""The transformers generation engine (the CPU default), on tiny random VLMs of two families.

Everything the engine reports is compared with an independent computation on the same model:
log-probs with one teacher-forced forward pass over prompt + completion (built through the VLM
module exactly as the learner builds it), greedy tokens with the arg-max of that forward, weight
checksums with the checksums of the source tensors.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from vlgrpo.modules import resolve_module
from vlgrpo.modules.loading import checkpoint_name_map, load_model_and_processor
from vlgrpo.rollout.hf_engine import TransformersEngine, tensor_checksum
from vlgrpo.rollout.types import Sample, SamplingConfig

FAMILIES = ("qwen2-vl", "internvl")
LOGPROB_TOL = 1e-4  # fp32 on both sides
G = 3


# -- data ----------------------------------------------------------------------------------------
def _image(colour: str, size=(56, 56), shape: str = "circle") -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colour)
    return img


def _sample(sid: str, images: list[Image.Image], text: str) -> Sample:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return Sample(sample_id=sid, prompt=[{"role": "user", "content": content}], images=images, solution="red")


SAMPLES = [
    _sample("one-image", [_image("red")], "What colour is the shape?"),
    _sample("two-images", [_image("blue"), _image("green", shape="square")], "Which shapes do you see?"),
    # different sizes in one prompt (and a batch mixing prompt lengths: left padding)
    _sample("mixed-sizes", [_image("yellow", size=(90, 40)), _image("red", size=(40, 120), shape="square")],
            "Compare the two shapes."),
]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tiny_model_factory):
    return str(tiny_model_factory(family))


def _new_engine(model_dir: str) -> TransformersEngine:
    return TransformersEngine(model_dir, resolve_module(model_dir))


@pytest.fixture(scope="module")
def engine(model_dir):
    """The checkpoint's weights, untouched (tests that load weights build their own engine)."""
    return _new_engine(model_dir)


def _eos_boost_weights(eng: TransformersEngine, alpha: float = 4.0) -> list[tuple[str, torch.Tensor]]:
    """A random tiny model almost never samples EOS (p ~ 1/vocab). The final hidden states share a
    large common direction ``mu``; giving the EOS row of the output embedding ``alpha * mu / |mu|^2``
    makes the EOS logit ~alpha: completions then stop at varied lengths (and some run to the limit).
    Returned as (checkpoint name, tensor), to be loaded with ``load_weights``."""
    module, model, processor = eng.module, eng.model, eng.processor
    text = module.prepare_prompt(processor, [{"prompt": SAMPLES[0].prompt}])
    inputs = module.prepare_model_inputs(processor, text, [SAMPLES[0].images])
    with torch.no_grad():
        h = model(**inputs, output_hidden_states=True).hidden_states[-1][0].float()
    mu = h.mean(0)
    new = model.get_output_embeddings().weight.detach().clone()
    new[eng.eos_ids[0]] = alpha * mu / mu.norm() ** 2
    return [(_head_checkpoint_name(model), new)]


def _head_checkpoint_name(model) -> str:
    """Checkpoint (on-disk) name of the output embedding."""
    head = model.get_output_embeddings().weight
    mem_name = next(n for n, p in model.named_parameters() if p is head)
    return (checkpoint_name_map(model) or {}).get(mem_name, mem_name)


@pytest.fixture(scope="module")
def eos_engine(model_dir):
    """An engine whose model emits EOS often (loaded through ``load_weights``)."""
    eng = _new_engine(model_dir)
    assert eng.load_weights(iter(_eos_boost_weights(eng)), version=1) == 1
    assert eng.weights_version == 1
    return eng


# -- independent computations --------------------------------------------------------------------
@torch.no_grad()
def reference_logits(module, model, processor, prompt_text, images, token_lists, pad_id):
    """Teacher-forced logits [G, T, V] at the completion positions of ``token_lists`` (one forward
    over prompt + right-padded completions, inputs built by the VLM module like the learner does)."""
    g = len(token_lists)
    inputs = module.prepare_model_inputs(processor, [prompt_text] * g, [images] * g)
    width = max(len(t) for t in token_lists)
    ids = torch.full((g, width), pad_id, dtype=torch.long)
    mask = torch.zeros((g, width), dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    full = module.append_completions(inputs, ids, mask)
    prompt_len = inputs["input_ids"].shape[1]
    return model(**full).logits[:, prompt_len - 1:prompt_len - 1 + width].float(), ids


def reference_logprobs(eng, model, prompt_text, images, token_lists, temperature):
    """log_softmax(logits / T) without the vision tokens, gathered at the completion tokens
    (T <= 0: greedy, raw logits)."""
    logits, ids = reference_logits(eng.module, model, eng.processor, prompt_text, images, token_lists, eng.pad_id)
    if temperature > 0:
        logits = logits / temperature
    logits[..., eng.module.vision_token_ids(eng.processor)] = float("-inf")  # never sampled
    lp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return [lp[i, :len(t)] for i, t in enumerate(token_lists)]


def max_logprob_diff(eng, model, samples, results, temperature) -> tuple[float, int]:
    worst, compared = 0.0, 0
    for s, res in zip(samples, results):
        toks = [c.token_ids for c in res.completions]
        for c, ref in zip(res.completions, reference_logprobs(eng, model, res.prompt_text, s.images, toks, temperature)):
            assert len(c.logprobs) == len(c.token_ids) == len(ref)
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            worst = max(worst, (got - ref.double()).abs().max().item())
            compared += len(ref)
    return worst, compared


def config_vision_ids(model) -> set[int]:
    """Image / video placeholder and delimiter ids the checkpoint's config names."""
    skip = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"}
    return {v for k, v in model.config.to_dict().items()
            if k.endswith("_token_id") and k not in skip and isinstance(v, int)}


def _ids(results):
    return [[c.token_ids for c in r.completions] for r in results]


# -- G completions per prompt ----------------------------------------------------------------------
def test_group_per_prompt_one_and_two_images(engine):
    sampling = SamplingConfig(n=G, temperature=1.0, max_tokens=8, seed=11)
    results = engine.generate(SAMPLES, sampling)
    assert len(results) == len(SAMPLES)
    expected_texts = engine.module.prepare_prompt(engine.processor, [{"prompt": s.prompt} for s in SAMPLES])
    tok = engine.tokenizer()
    for s, res, text in zip(SAMPLES, results, expected_texts):
        assert res.prompt_text == text
        assert text.count(tok.convert_ids_to_tokens(engine.model.config.image_token_id)) == len(s.images)
        assert len(res.completions) == G
        assert len({tuple(c.token_ids) for c in res.completions}) > 1, "the G samples should differ"
        for c in res.completions:
            assert 1 <= len(c.token_ids) <= sampling.max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(x) and x <= 0.0 for x in c.logprobs)
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert engine.generate([], sampling) == []


# -- log-probs == a separate forward pass --------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_forward_pass(eos_engine, temperature):
    """Completions of varied lengths (EOS-boosted model), three prompts in one padded batch."""
    results = eos_engine.generate(SAMPLES, SamplingConfig(n=G, temperature=temperature, max_tokens=10, seed=3))
    lengths = {len(c.token_ids) for r in results for c in r.completions}
    assert len(lengths) > 1, "want completions of several lengths (padding in the reference batch)"
    worst, compared = max_logprob_diff(eos_engine, eos_engine.model, SAMPLES, results, temperature)
    assert compared >= 12
    assert worst < LOGPROB_TOL, f"engine log-probs differ from a forward pass by {worst:.2e} (T={temperature})"


def test_each_prompt_processed_and_prefilled_once_and_chunks_keep_groups(eos_engine, monkeypatch):
    """Shared prefix: the processor sees each prompt once (not G times); with ``max_batch_size`` 2 < G rows a
    chunk holds one prompt and its G rows; log-probs still those of a separate forward pass."""
    seen = []
    prepare = eos_engine.module.prepare_model_inputs
    monkeypatch.setattr(eos_engine.module, "prepare_model_inputs",
                        lambda proc, texts, images, **kw: seen.append(len(texts)) or prepare(proc, texts, images, **kw))
    monkeypatch.setattr(eos_engine, "max_batch_size", 2)
    results = eos_engine.generate(SAMPLES, SamplingConfig(n=G, temperature=1.0, max_tokens=6, seed=5))
    assert seen == [1, 1, 1] and [len(r.completions) for r in results] == [G] * len(SAMPLES)
    worst, _ = max_logprob_diff(eos_engine, eos_engine.model, SAMPLES, results, 1.0)
    assert worst < LOGPROB_TOL


@pytest.mark.parametrize("shared", [True, False])
def test_the_callers_prompt_inputs_replace_the_processor(eos_engine, monkeypatch, shared):
    """Given each prompt's inputs (the rollout worker's length check made them), the engine runs no processor and
    samples what it samples from its own processing, token for token (same seed), shared prefix or per row."""
    monkeypatch.setattr(type(eos_engine.module), "supports_shared_prefix", shared)
    sampling = SamplingConfig(n=G, temperature=1.0, max_tokens=6, seed=5)
    own = eos_engine.generate(SAMPLES, sampling)
    module, proc = eos_engine.module, eos_engine.processor
    texts = module.prepare_prompt(proc, [{"prompt": s.prompt} for s in SAMPLES])
    given = [module.prepare_model_inputs(proc, [t], [s.images]) for t, s in zip(texts, SAMPLES)]
    monkeypatch.setattr(module, "prepare_model_inputs", lambda *a, **kw: pytest.fail("the processor ran again"))
    results = eos_engine.generate(SAMPLES, sampling, given)
    for r, o in zip(results, own):
        assert [c.token_ids for c in r.completions] == [c.token_ids for c in o.completions]
        for c, d in zip(r.completions, o.completions):
            assert c.logprobs == pytest.approx(d.logprobs, abs=1e-5)


def test_per_row_generate_for_modules_without_shared_prefix(eos_engine, monkeypatch):
    """A module that does not declare ``supports_shared_prefix`` gets a ``generate`` row per completion, in
    chunks of ``max_batch_size`` rows, with the same log-prob contract."""
    calls, orig = [], eos_engine.model.generate
    monkeypatch.setattr(type(eos_engine.module), "supports_shared_prefix", False)
    monkeypatch.setattr(eos_engine, "max_batch_size", 2)
    monkeypatch.setattr(eos_engine.model, "generate", lambda *a, **kw: calls.append(kw["input_ids"].shape[0]) or orig(*a, **kw))
    results = eos_engine.generate(SAMPLES, SamplingConfig(n=G, temperature=0.7, max_tokens=6, seed=5))
    assert calls == [2, 2, 2, 2, 1]  # 3 prompts x G=3 rows, 2 per call
    worst, _ = max_logprob_diff(eos_engine, eos_engine.model, SAMPLES, results, 0.7)
    assert worst < LOGPROB_TOL


@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (-1, 0.3)])
def test_top_k_and_top_p_sample_only_inside_the_cut(eos_engine, top_k, top_p):
    """Every sampled token is among the ``top_k`` best, or inside the ``top_p`` nucleus, of a separate forward
    pass's distribution at its position; the reported log-prob stays the one before the cut."""
    sampling = SamplingConfig(n=6, temperature=1.0, top_k=top_k, top_p=top_p, max_tokens=8, seed=9)
    results, vision = eos_engine.generate(SAMPLES, sampling), eos_engine.module.vision_token_ids(eos_engine.processor)
    checked = 0
    for s, res in zip(SAMPLES, results):
        toks = [c.token_ids for c in res.completions]
        logits, ids = reference_logits(eos_engine.module, eos_engine.model, eos_engine.processor, res.prompt_text,
                                       s.images, toks, eos_engine.pad_id)
        logits[..., vision] = float("-inf")
        probs = logits.softmax(-1)
        for r, t in enumerate(toks):
            for j, tok in enumerate(t):
                above = probs[r, j] > probs[r, j, tok]  # tokens more likely than the sampled one
                assert int(above.sum()) < top_k if top_k > 0 else float(probs[r, j][above].sum()) < top_p
                checked += 1
    assert checked >= 15
    assert max_logprob_diff(eos_engine, eos_engine.model, SAMPLES, results, 1.0)[0] < LOGPROB_TOL


# -- finish reasons, seeds, vision tokens ----------------------------------------------------------
def test_finish_reason_stop_iff_last_token_is_eos(eos_engine):
    max_tokens = 10
    results = eos_engine.generate(SAMPLES, SamplingConfig(n=6, temperature=1.0, max_tokens=max_tokens, seed=21))
    eos = set(eos_engine.eos_ids)
    assert eos == {eos_engine.tokenizer().convert_tokens_to_ids("<|im_end|>")}
    reasons = []
    for r in results:
        for c in r.completions:
            reasons.append(c.finish_reason)
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "stop") == (c.token_ids[-1] in eos)
            assert not eos & set(c.token_ids[:-1]), "nothing may follow EOS"
            if c.finish_reason == "length":
                assert len(c.token_ids) == max_tokens
    assert "stop" in reasons and "length" in reasons, reasons


def test_same_seed_reproduces(engine):
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=1234)
    a = engine.generate(SAMPLES[:2], sampling)
    b = engine.generate(SAMPLES[:2], sampling)
    assert _ids(a) == _ids(b)
    assert [[c.logprobs for c in r.completions] for r in a] == [[c.logprobs for c in r.completions] for r in b]
    c = engine.generate(SAMPLES[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=4321))
    assert _ids(c) != _ids(a)


def test_vision_tokens_never_sampled(model_dir, monkeypatch):
    """Even a model that strongly prefers the image placeholders / vision delimiters (their output
    rows boosted like the EOS row above) never samples them."""
    eng = _new_engine(model_dir)
    vision = eng.module.vision_token_ids(eng.processor)
    assert set(vision) >= config_vision_ids(eng.model), (vision, config_vision_ids(eng.model))
    assert not set(eng.eos_ids) & set(vision)
    ((head, w),) = _eos_boost_weights(eng, alpha=5.0)
    w[vision] = w[eng.eos_ids[0]].clone()
    w[eng.eos_ids[0]] = eng.model.get_output_embeddings().weight[eng.eos_ids[0]].detach()  # EOS as before
    eng.load_weights([(head, w)], version=1)
    sampling = SamplingConfig(n=4, temperature=1.5, max_tokens=12, seed=99)

    def sampled(results):
        return [t for r in results for c in r.completions for t in c.token_ids]

    tokens = sampled(eng.generate(SAMPLES, sampling))
    assert len(tokens) >= 100
    assert not set(vision) & set(tokens)
    # The check has teeth: without the suppression the same sampling does produce them.
    monkeypatch.setattr(eng, "suppress_ids", [])
    unsuppressed = sampled(eng.generate(SAMPLES, sampling))
    assert sum(t in vision for t in unsuppressed) >= 5  # vs ~1 expected from the unboosted model


# -- what reaches generate -------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_non_generate_params_never_reach_generate(engine, monkeypatch, shared):
    monkeypatch.setattr(type(engine.module), "supports_shared_prefix", shared)
    module = engine.module
    texts = module.prepare_prompt(engine.processor, [{"prompt": s.prompt} for s in SAMPLES])
    full = module.prepare_model_inputs(engine.processor, texts, [s.images for s in SAMPLES])
    calls = []
    orig = engine.model.forward if shared else engine.model.generate

    def spy(*args, **kwargs):
        assert not args
        calls.append(dict(kwargs))
        return orig(*args, **kwargs)

    if shared:  # the prefill: the model's forward with the prompts, each once
        monkeypatch.setattr(engine.model, "forward", spy)
    else:
        monkeypatch.setattr(engine.model, "generate", spy)
    engine.generate(SAMPLES, SamplingConfig(n=2, max_tokens=2, seed=0))
    assert len(calls) == (2 if shared else 1)  # shared: the prefill, then one decoding step
    kw = calls[0]
    expected = set(full) - set(module.get_non_generate_params())
    assert expected <= set(kw)
    assert not set(module.get_non_generate_params()) & set(kw)
    assert kw["input_ids"].shape[0] == (1 if shared else 2) * len(SAMPLES)  # each prompt once, or repeated n times
    assert kw["pixel_values"].shape[0] == (1 if shared else 2) * full["pixel_values"].shape[0]
    if not shared:
        assert set(kw["suppress_tokens"]) == set(module.vision_token_ids(engine.processor))
    if module.get_vlm_key() == "internvl":
        assert "image_flags" in full, "the learner's inputs carry image_flags..."
        assert "image_flags" not in kw, "...generate must not receive them"
        assert "pixel_values" in kw
    else:
        assert {"pixel_values", "image_grid_thw"} <= set(kw)


# -- weights ---------------------------------------------------------------------------------------
def _greedy(eng, max_tokens=8):
    return eng.generate(SAMPLES, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))


def _assert_greedy_is_argmax(eng, model, results):
    """Greedy tokens are the arg-max (vision tokens excluded) of ``model``'s forward and their
    log-probs are log_softmax of its raw logits."""
    banned = torch.tensor(eng.module.vision_token_ids(eng.processor))
    for s, r in zip(SAMPLES, results):
        toks = [r.completions[0].token_ids]
        logits, _ = reference_logits(eng.module, model, eng.processor, r.prompt_text, s.images, toks, eng.pad_id)
        logits[..., banned] = float("-inf")
        assert logits[0].argmax(-1).tolist() == toks[0]
    worst, _ = max_logprob_diff(eng, model, SAMPLES, results, 0.0)
    assert worst < LOGPROB_TOL


def test_load_weights_from_safetensors_changes_greedy_outputs(model_dir, family, tiny_model_factory):
    eng = _new_engine(model_dir)
    own = load_file(f"{model_dir}/model.safetensors")
    before = _greedy(eng)
    assert eng.weights_checksum() == {n: tensor_checksum(t) for n, t in own.items()}

    other_dir = str(tiny_model_factory(family, seed=1))
    other = load_file(f"{other_dir}/model.safetensors")  # checkpoint names, as the learner sends them
    assert set(other) == set(own)
    n = eng.load_weights(((k, v) for k, v in other.items()), version=3)  # an iterator, not a list
    assert n == len(other)
    assert eng.weights_version == 3
    assert eng.weights_checksum() == {k: tensor_checksum(v) for k, v in other.items()}
    head = _head_checkpoint_name(eng.model)  # lm_head.weight / language_model.lm_head.weight
    assert eng.weights_checksum([head]) == {head: tensor_checksum(other[head])}

    after = _greedy(eng)
    assert _ids(after) != _ids(before)
    # The new greedy tokens are those of the seed-1 model (loaded independently from disk) on the
    # same prompt tokens.
    other_model, _ = load_model_and_processor(other_dir, resolve_module(other_dir), torch.float32)
    _assert_greedy_is_argmax(eng, other_model, after)

    # Back to the engine's own checkpoint: the original outputs return exactly.
    eng.load_weights(iter(own.items()), version=4)
    assert eng.weights_version == 4
    restored = _greedy(eng)
    assert _ids(restored) == _ids(before)
    assert [r.completions[0].logprobs for r in restored] == [r.completions[0].logprobs for r in before]
    _assert_greedy_is_argmax(eng, eng.model, restored)


def test_loaded_weights_do_not_alias_shared_memory(model_dir):
    """A shared-memory sync hands the engine views of the learner's live weights: the engine must
    copy them, so that the learner's next update does not reach it before the next sync."""
    from ..conftest import shared_copy

    eng = _new_engine(model_dir)
    names = list(eng.weights_checksum())
    state = {n: t for n, t in eng.model.state_dict().items()}
    named = [(ck, state[mem].clone() + 0.01) for mem, ck in (checkpoint_name_map(eng.model) or {n: n for n in names}).items()]
    region, views = shared_copy(named)
    eng.load_weights(views, version=3)
    want = {n: tensor_checksum(t) for n, t in named}
    assert eng.weights_checksum() == want
    region.tensor.zero_()  # the learner's next update, without a sync
    assert eng.weights_checksum() == want


def test_load_weights_by_checkpoint_name_map(model_dir):
    """Weights of an in-memory model, renamed to checkpoint names with ``checkpoint_name_map``
    (what the learner does), land in the engine's model."""
    eng = _new_engine(model_dir)
    before = _greedy(eng, max_tokens=6)
    src = copy.deepcopy(eng.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * (p.std() if p.numel() > 1 else 1.0))
    names = checkpoint_name_map(src)
    assert names, "the tiny model's conversions are pure renamings"
    assert any(mem != ck for mem, ck in names.items()), "transformers renames some tensors in memory"
    state = src.state_dict()
    assert eng.load_weights(((ck, state[mem]) for mem, ck in names.items()), version=7) == len(names)
    assert eng.weights_version == 7
    assert eng.weights_checksum() == {ck: tensor_checksum(state[mem]) for mem, ck in names.items()}
    after = _greedy(eng, max_tokens=6)
    assert _ids(after) != _ids(before)
    _assert_greedy_is_argmax(eng, src, after)


def test_load_weights_errors(model_dir):
    eng = _new_engine(model_dir)
    sums = eng.weights_checksum()
    with pytest.raises(KeyError, match=r"model\.no_such_layer\.weight.*not a parameter"):
        eng.load_weights([("model.no_such_layer.weight", torch.zeros(3))], version=1)
    head = _head_checkpoint_name(eng.model)
    with pytest.raises(ValueError, match=re.escape(head) + r".*\(3, 3\)"):
        eng.load_weights(iter([(head, torch.zeros(3, 3))]), version=1)
    assert eng.weights_version == 0
    assert eng.weights_checksum() == sums
