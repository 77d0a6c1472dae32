"""The rollout worker on a synthetic task: in-process (the typed batch, rewards, concatenation, the
prompt-length limit, the config reaching the engine) and as a Ray actor on a local cluster (batch
with rewards, health/version, bad dataset rows)."""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from vlgrpo.modules.loading import ModelConfig, checkpoint_name_map, read_model_config
from vlgrpo.rollout.data import DataSource, load_datasets
from vlgrpo.rollout.rewards import RewardSet
from vlgrpo.rollout.synthetic import make_dataset
from vlgrpo.rollout.types import RolloutBatch, SamplingConfig, concat_rollouts
from vlgrpo.rollout.worker import RolloutConfig, RolloutWorker, make_engine, resolve_engine_name

REWARDS = [
    {"name": "accuracy"},
    {"name": "format", "weight": 0.5},
    {"name": "length", "weight": 0.25, "kwargs": {"max_len": 8, "cache": 4}},  # varies with token count
]
LOGPROB_TOL = 1e-4


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("color")
    make_dataset("color", 16, out)
    return out


@pytest.fixture(scope="module")
def dataset(data_dir):
    ds = load_datasets(DataSource(data_dir / "data.jsonl"))
    assert len(ds) == 16 and ds.skipped == {}
    return ds


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return str(tiny_model_factory("qwen2-vl"))


def _cfg(**kw) -> RolloutConfig:
    """The ``rollout`` section for the transformers engine with ``REWARDS``. ``num_threads=0``
    leaves torch's threads alone: an in-process worker must not pin this test session to 1."""
    return RolloutConfig(**{"engine": "transformers", "rewards": REWARDS, "num_threads": 0, **kw})


def _worker(model_dir, worker_id: int = 0, **kw) -> RolloutWorker:
    return RolloutWorker(_cfg(**kw), ModelConfig(path=model_dir), worker_id=worker_id)


def eos_boost_weights(worker: RolloutWorker, sample, alpha: float = 4.0) -> list[tuple[str, torch.Tensor]]:
    """A random tiny model almost never samples EOS. The final hidden states share a large common
    direction ``mu``: an EOS row ``alpha * mu / |mu|^2`` in the output embedding makes completions stop
    at varied lengths (so batches have padding). Returned under the checkpoint name."""
    eng = worker.engine
    model, module, processor = eng.model, eng.module, eng.processor
    text = module.prepare_prompt(processor, [{"prompt": sample.prompt}])
    inputs = module.prepare_model_inputs(processor, text, [sample.images])
    with torch.no_grad():
        mu = model(**inputs, output_hidden_states=True).hidden_states[-1][0].float().mean(0)
    head = model.get_output_embeddings().weight
    mem = next(n for n, p in model.named_parameters() if p is head)
    new = head.detach().clone()
    new[eng.eos_ids[0]] = alpha * mu / mu.norm() ** 2
    return [((checkpoint_name_map(model) or {}).get(mem, mem), new)]


@pytest.fixture(scope="module")
def worker_and_weights(model_dir, dataset):
    w = _worker(model_dir)
    assert w.engine.weights_version == 0 and w.health()["version"] == 0
    weights = eos_boost_weights(w, dataset[0])
    assert w.load_weights(weights, version=1) == 1
    assert w.engine.weights_version == 1 and w.health()["version"] == 1
    return w, weights


@pytest.fixture(scope="module")
def worker(worker_and_weights):
    return worker_and_weights[0]


@pytest.fixture(scope="module")
def eos_weights(worker_and_weights):
    return worker_and_weights[1]


# -- independent checks --------------------------------------------------------------------------
def _rows(samples, group_size):
    return [s for s in samples for _ in range(group_size)]


def expected_rewards(batch: RolloutBatch, samples) -> torch.Tensor:
    """A fresh RewardSet on the batch's texts and (mask-derived) token counts."""
    lengths = batch.completion_mask.sum(1).tolist()
    scores, names, weights, errors = RewardSet(REWARDS).score(
        batch.completions_text, _rows(samples, batch.group_size), completion_lengths=lengths)
    assert names == batch.reward_names and weights == batch.reward_weights
    assert errors == batch.reward_errors
    return scores


def hand_length_reward(n: int, max_len=8, cache=4) -> float:
    return max(-1.0, min(0.0, (max_len - cache - n) / cache))


@torch.no_grad()
def reference_logprobs(worker: RolloutWorker, batch: RolloutBatch, samples) -> torch.Tensor:
    """What the learner computes: the prompts rebuilt from the batch's text and the samples' images, completions
    appended with the module, one forward, log_softmax at T=1 without the vision tokens, gathered at the batch's tokens."""
    eng = worker.engine
    g = batch.group_size
    inputs = eng.module.prepare_model_inputs(eng.processor, [t for t in batch.prompts_text for _ in range(g)],
                                             [s.images for s in samples for _ in range(g)])
    full = eng.module.append_completions(inputs, batch.completion_ids, batch.completion_mask)
    L, T = inputs["input_ids"].shape[1], batch.completion_ids.shape[1]
    logits = eng.model(**full).logits[:, L - 1:L - 1 + T].float()
    logits[..., eng.module.vision_token_ids(eng.processor)] = float("-inf")  # never sampled
    return torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def check_batch(batch: RolloutBatch, samples, worker: RolloutWorker, group_size: int, max_tokens):
    """Shapes, padding, texts and finish reasons of a batch against its own tokens (``max_tokens``:
    the limit, or one limit per row)."""
    n = len(samples) * group_size
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    tok = worker.engine.tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert batch.sample_ids == [s.sample_id for s in samples]
    assert len(batch.prompts_text) == len(samples) and batch.group_size == group_size
    assert batch.prompts_text == worker.module.prepare_prompt(worker.processor, [{"prompt": s.prompt} for s in samples])
    assert batch.images == [[] for _ in samples]  # not sent back: the caller has them (the fleet puts them back)
    ids, mask, lps = batch.completion_ids, batch.completion_mask, batch.sampling_logprobs
    assert ids.dtype == torch.long and mask.dtype == torch.bool and lps.dtype == torch.float32
    lengths = mask.sum(1)
    assert ids.shape == mask.shape == lps.shape == (n, int(lengths.max()))
    assert 1 <= int(lengths.min()) and all(int(k) <= m for k, m in zip(lengths, limits))
    assert batch.rewards.shape == (n, len(REWARDS)) and batch.rewards.dtype == torch.float32
    assert len(batch.completions_text) == len(batch.finish_reasons) == n
    assert batch.pad_token_id == tok.pad_token_id
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    assert torch.equal(mask, positions < lengths.unsqueeze(1)), "the mask is a prefix of each row"
    assert bool((ids[~mask] == batch.pad_token_id).all())
    assert bool((lps[~mask] == 0).all())
    assert bool((lps[mask] < 0).all()) and bool(torch.isfinite(lps).all())
    for i in range(n):
        k = int(lengths[i])
        row = ids[i, :k].tolist()
        assert batch.completions_text[i] == tok.decode(row, skip_special_tokens=True)
        assert (batch.finish_reasons[i] == "stop") == (row[-1] == eos)
        assert batch.finish_reasons[i] == "stop" or k == limits[i]
    assert batch.timings["completion_tokens"] == float(lengths.sum())
    assert batch.timings["generate_s"] > 0 and batch.timings["reward_s"] >= 0


# -- in-process -----------------------------------------------------------------------------------
def test_batch_shapes_padding_and_rewards(worker, dataset):
    samples = [dataset[i] for i in range(4)]
    G, max_tokens = 3, 8
    batch = worker.generate(samples, SamplingConfig(n=G, temperature=1.0, max_tokens=max_tokens, seed=0))
    check_batch(batch, samples, worker, G, max_tokens)
    lengths = batch.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "want rows of several lengths (padding)"
    assert batch.weights_version == 1
    assert batch.skipped_prompts == {}

    # Rewards: the same numbers as an independent RewardSet, and a column by hand.
    assert torch.equal(batch.rewards, expected_rewards(batch, samples))
    li = batch.reward_names.index("length")
    assert batch.rewards[:, li].tolist() == [hand_length_reward(int(k)) for k in lengths]
    assert len(set(batch.rewards[:, li].tolist())) > 1
    w = torch.tensor([r.get("weight", 1.0) for r in REWARDS])
    assert torch.allclose(batch.total_rewards(), (batch.rewards * w).sum(-1))

    # The sampling log-probs are those the learner recomputes from the batch alone.
    ref = reference_logprobs(worker, batch, samples)
    diff = (ref - batch.sampling_logprobs)[batch.completion_mask].abs().max().item()
    assert diff < LOGPROB_TOL, f"sampling log-probs differ from a forward over the batch by {diff:.2e}"


def test_the_processor_runs_once_a_prompt_in_the_worker(worker, dataset, monkeypatch):
    """The length check's inputs feed the engine: one processor call per prompt in the whole of ``generate``."""
    calls, prepare = [], worker.module.prepare_model_inputs
    monkeypatch.setattr(worker.module, "prepare_model_inputs", lambda proc, texts, images, **kw:
                        calls.append(len(texts)) or prepare(proc, texts, images, **kw))
    batch = worker.generate([dataset[i] for i in range(3)], SamplingConfig(n=4, max_tokens=3, seed=0))
    assert calls == [1, 1, 1] and batch.completion_ids.shape[0] == 12


def test_generate_records_each_images_model_input_size(worker, dataset):
    """The ``iou`` reward maps a box from the model's input to the image: generate records each
    sample's first-image input size (w, h) as the processor resizes it (Qwen2-VL: 28-pixel steps)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    samples = [dataset[0], dataset[1]]
    samples[1].images = [Image.new("RGB", (50, 70), "white")]
    worker.generate(samples, SamplingConfig(n=1, max_tokens=2, seed=0))
    ip = worker.processor.image_processor
    for s in samples:
        (w, h), pixels = s.images[0].size, ip.size
        rh, rw = smart_resize(h, w, factor=ip.patch_size * ip.merge_size,
                              min_pixels=pixels["shortest_edge"], max_pixels=pixels["longest_edge"])
        assert s.meta["input_size"] == (rw, rh)
    assert samples[1].meta["input_size"] == (56, 56)


def test_concat_rollouts_repads(worker, dataset):
    sa, sb = [dataset[i] for i in range(4, 6)], [dataset[i] for i in range(6, 9)]
    a = worker.generate(sa, SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=1))
    b = worker.generate(sb, SamplingConfig(n=2, temperature=1.0, max_tokens=3, seed=2))
    ta, tb = a.completion_ids.shape[1], b.completion_ids.shape[1]
    assert ta > tb, (ta, tb)
    c = concat_rollouts([a, b])
    na, nb = a.completion_ids.shape[0], b.completion_ids.shape[0]
    assert c.completion_ids.shape == c.completion_mask.shape == c.sampling_logprobs.shape == (na + nb, ta)
    for part, rows, width in ((a, range(0, na), ta), (b, range(na, na + nb), tb)):
        for j, i in enumerate(rows):
            assert torch.equal(c.completion_ids[i, :width], part.completion_ids[j])
            assert torch.equal(c.completion_mask[i, :width], part.completion_mask[j])
            assert torch.equal(c.sampling_logprobs[i, :width], part.sampling_logprobs[j])
            assert bool((c.completion_ids[i, width:] == c.pad_token_id).all())
            assert not bool(c.completion_mask[i, width:].any())
            assert bool((c.sampling_logprobs[i, width:] == 0).all())
    assert torch.equal(c.rewards, torch.cat([a.rewards, b.rewards]))
    assert c.sample_ids == a.sample_ids + b.sample_ids
    assert c.prompts_text == a.prompts_text + b.prompts_text
    assert c.completions_text == a.completions_text + b.completions_text
    assert c.finish_reasons == a.finish_reasons + b.finish_reasons
    assert len(c.images) == 5
    assert c.reward_names == a.reward_names and c.group_size == 2 and c.weights_version == 1
    assert c.reward_errors == {k: a.reward_errors[k] + b.reward_errors[k] for k in a.reward_errors}
    assert c.timings["completion_tokens"] == a.timings["completion_tokens"] + b.timings["completion_tokens"]
    assert torch.equal(c.total_rewards(), torch.cat([a.total_rewards(), b.total_rewards()]))
    # The concatenated batch is still consistent on its own (mask / pads / texts) and its rewards
    # equal an independent scoring of all rows.
    check_batch(c, sa + sb, worker, 2, [10] * na + [3] * nb)
    assert torch.equal(c.rewards, expected_rewards(c, sa + sb))
    assert concat_rollouts([a]) is a


def _prompt_tokens(worker: RolloutWorker, sample) -> int:
    """Prompt length (text + image tokens) as the learner's processor builds it."""
    text = worker.module.prepare_prompt(worker.processor, [{"prompt": sample.prompt}])
    return int(worker.module.prepare_model_inputs(worker.processor, text, [sample.images])["input_ids"].shape[1])


def _longer(sample, words: int = 12):
    """``sample`` with its question padded by ``words`` words (a longer prompt, same image)."""
    s = copy.deepcopy(sample)
    s.sample_id = sample.sample_id + "-long"
    text = next(c for c in s.prompt[-1]["content"] if c.get("type") == "text")
    text["text"] += " please" * words
    return s


def test_prompt_length_limit_is_context_minus_max_tokens(model_dir, worker, dataset):
    """The limit is ``min(max_position_embeddings, rollout.max_model_len) - max_tokens``: a prompt
    of exactly that length is generated, a longer one is skipped and counted, never generated."""
    positions = read_model_config(model_dir)["text_config"]["max_position_embeddings"]
    assert worker.context_len == min(positions, RolloutConfig.max_model_len)
    assert _worker(model_dir, max_model_len=10 * positions).context_len == positions

    short = dataset[0]
    long = _longer(short)
    n_short, n_long = _prompt_tokens(worker, short), _prompt_tokens(worker, long)
    assert n_long > n_short
    max_tokens = 4
    small = _worker(model_dir, max_model_len=n_short + max_tokens)
    assert small.context_len == n_short + max_tokens < positions

    batch = small.generate([long, short], SamplingConfig(n=2, max_tokens=max_tokens, seed=0))
    assert batch.skipped_prompts == {"prompt_too_long": [long.sample_id]}
    assert batch.sample_ids == [short.sample_id] and batch.completion_ids.shape[0] == 2
    assert int(batch.completion_mask.sum(1).max()) <= max_tokens
    check_batch(batch, [short], small, 2, max_tokens)

    # One more completion token and the short prompt no longer fits either: nothing is generated.
    none = small.generate([long, short], SamplingConfig(n=2, max_tokens=max_tokens + 1, seed=0))
    assert none.skipped_prompts == {"prompt_too_long": [long.sample_id, short.sample_id]}
    assert none.sample_ids == [] and none.completion_ids.shape[0] == 0
    assert none.rewards.shape == (0, len(REWARDS)) and none.reward_names == batch.reward_names


def test_engine_choice_and_model_config_reach_the_engine(model_dir, worker, dataset):
    """``rollout.engine``: ``auto`` is transformers unless vLLM and a GPU are both there; ``vllm``
    where vLLM is not installed fails with the install hint. The model section's
    ``processing_kwargs`` and ``init_kwargs`` reach the transformers engine as they reach the
    learner (``load_model_and_processor``)."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    assert resolve_engine_name("transformers") == "transformers"
    assert resolve_engine_name("auto") == ("vllm" if has_vllm and torch.cuda.is_available() else "transformers")
    if not has_vllm:
        with pytest.raises(ValueError, match="vllm is not installed"):
            resolve_engine_name("vllm")

    sample = copy.deepcopy(dataset[0])
    sample.images = [sample.images[0].resize((224, 112))]  # larger than the max_pixels below
    n_default = _prompt_tokens(worker, sample)
    eng = make_engine(_cfg(), ModelConfig(path=model_dir, processing_kwargs={"max_pixels": 28 * 28 * 4},
                                          init_kwargs={"attn_implementation": "eager"}))
    text = eng.module.prepare_prompt(eng.processor, [{"prompt": sample.prompt}])
    n_small = eng.module.prepare_model_inputs(eng.processor, text, [sample.images])["input_ids"].shape[1]
    assert n_small < n_default, "max_pixels should cut the image into fewer tokens"
    assert eng.model.config._attn_implementation == "eager"
    assert worker.engine.model.config._attn_implementation != "eager"


# -- on Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def actor(ray_session, model_dir):
    """The worker as the cluster runs it: a Ray actor with one torch thread."""
    import ray

    a = ray.remote(RolloutWorker).options(num_cpus=1).remote(_cfg(num_threads=1), ModelConfig(path=model_dir),
                                                              worker_id=3)
    yield a
    ray.kill(a)


@pytest.mark.slow
def test_ray_actor_returns_batch_with_rewards(ray_session, actor, worker, eos_weights, dataset):
    import ray

    health = ray.get(actor.health.remote(), timeout=300)
    assert health["worker"] == 3 and health["engine"] == "TransformersEngine"
    assert health["pid"] != os.getpid() and health["version"] == 0
    assert ray.get(actor.weights_checksum.remote(), timeout=60) != worker.weights_checksum()  # not loaded yet
    assert ray.get(actor.load_weights.remote(eos_weights, 5), timeout=60) == 1
    assert ray.get(actor.health.remote(), timeout=60)["version"] == 5
    # Same weights as the in-process worker: checksums agree.
    assert ray.get(actor.weights_checksum.remote(), timeout=60) == worker.weights_checksum()

    samples = [dataset[i] for i in range(9, 12)]
    G, max_tokens = 2, 8
    batch = ray.get(actor.generate.remote(samples, SamplingConfig(n=G, max_tokens=max_tokens, seed=3)), timeout=300)
    assert isinstance(batch, RolloutBatch)
    check_batch(batch, samples, worker, G, max_tokens)
    assert batch.weights_version == 5
    assert batch.timings["worker"] == 3.0
    assert torch.equal(batch.rewards, expected_rewards(batch, samples))
    diff = (reference_logprobs(worker, batch, samples) - batch.sampling_logprobs)[batch.completion_mask].abs().max().item()
    assert diff < LOGPROB_TOL


def _bad_rows_dataset(data_dir, out):
    """4 good rows of the synthetic set plus a missing image, a corrupt and a truncated image, a row
    whose answer is missing and one whose answer is empty (all in their own image folder)."""
    (out / "images").mkdir(parents=True)
    good = [json.loads(line) for line in (data_dir / "data.jsonl").read_text().splitlines()[:4]]
    for r in good:
        shutil.copy(data_dir / r["image"], out / r["image"])
    png = (data_dir / good[0]["image"]).read_bytes()
    (out / "images" / "corrupt.png").write_bytes(b"this is not a png" * 10)
    (out / "images" / "truncated.png").write_bytes(png[: len(png) // 2])

    def bad(i, image, answer="red"):
        conv = [{"from": "human", "value": "<image>What colour is the shape?"}]
        if answer is not None:
            conv.append({"from": "gpt", "value": answer})
        return {"id": f"bad-{i}", "image": image, "conversations": conv, "options": ["red", "green"]}

    rows = [good[0], bad(0, "images/missing.png"), good[1], bad(1, "images/corrupt.png"),
            bad(2, "images/truncated.png"), good[2], bad(3, good[3]["image"], answer=None),
            bad(4, good[3]["image"], answer="  "), good[3]]
    path = out / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r["id"] for r in good]


@pytest.mark.slow
def test_ray_actor_never_sees_bad_rows(ray_session, actor, data_dir, tmp_path):
    path, good_ids = _bad_rows_dataset(data_dir, tmp_path / "mixed")
    ds = load_datasets(DataSource(path))
    assert ds.skipped == {"missing_image": 1, "unreadable_image": 2, "no_answer": 2}
    assert ds.num_skipped == 5 and len(ds) == 4
    assert [r.sample_id for r in ds.records] == good_ids
    samples = [ds.get(i) for i in range(len(ds))]
    assert all(s is not None for s in samples)

    import ray

    batch = ray.get(actor.generate.remote(samples, SamplingConfig(n=2, max_tokens=4, seed=0)), timeout=300)
    assert batch.sample_ids == good_ids
    assert batch.completion_ids.shape[0] == 8 and batch.rewards.shape == (8, len(REWARDS))
    assert bool(torch.isfinite(batch.rewards).all())
    assert not any(i.startswith("bad-") for i in batch.sample_ids)
    assert sum(batch.reward_errors.values()) == 0


def test_a_vllm_without_the_rl_weight_reload_is_refused_at_start():
    """``VLLMEngine`` checks inside its workers that ``reload_weights`` takes tensors (vLLM 0.32:
    the worker forwards ``**kwargs`` to its model runner, which has ``weights_iterator``); versions
    whose reload takes no arguments are refused when the engine starts, not at the first sync."""
    from vlgrpo.rollout.vllm_engine import _takes_weights_iterator

    class Runner:
        def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True): ...

    class Worker:
        model_runner = Runner()

        def reload_weights(self, *args, **kwargs): ...

    class OldRunner:
        def reload_weights(self): ...

    class OldWorker:
        model_runner = OldRunner()

        def reload_weights(self): ...

    assert _takes_weights_iterator(Worker()) and not _takes_weights_iterator(OldWorker())
