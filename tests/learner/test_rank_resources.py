"""A learner rank's use of its resources and a tied-embedding policy (plain torch, in-process):
micro-batches reach the device one at a time, torch threads follow the rank's Ray CPUs, and a
tied model (as Qwen2.5-VL-3B) syncs into the transformers engine and saves/loads with ties kept."""
from __future__ import annotations

import weakref

import pytest
import torch

from .conftest import make_batch, make_learner, weights


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    from vlgrpo.modules.tiny import build_tiny_model

    return str(build_tiny_model("qwen2-vl", tmp_path_factory.mktemp("tied"), size="micro", tied=True))


def test_micro_batches_stay_on_the_cpu_until_their_turn(tiny_models):
    learner = make_learner(tiny_models["qwen2-vl"], micro_batch_size=2, beta=0.04, num_iterations=2)
    batch = make_batch(learner.module, learner.processor, num_prompts=3, group_size=2)  # 3 micro-batches
    device, learner.device = learner.device, torch.device("meta")  # where an eager move would show
    micros = learner.micro_batches(batch)
    assert len(micros) == 3
    for mb in micros:
        tensors = [*mb.inputs.values(), mb.ids, mb.mask, mb.adv]
        assert all(t.device.type == "cpu" for t in tensors)
        assert all(t.device.type == "meta" for t in learner.to_device(mb).inputs.values())  # control
    learner.device = device

    # during a step (ref + old pass, 2 iterations) at most the current and the previous micro-batch's
    # device copies are alive: spy copies stand in for device transfers
    to_device, alive, peak = learner.to_device, weakref.WeakSet(), []

    def spy(mb):
        out = to_device(mb)
        out.inputs = {k: v.clone() for k, v in out.inputs.items()}
        alive.add(out.inputs["pixel_values"])
        peak.append(len(alive))
        return out

    learner.to_device = spy
    m = learner.train_step(batch)
    assert len(peak) >= 3 * 2 * 2 and max(peak) <= 2, peak
    assert m["learner/num_micro_batches"] == 3 and m["policy/kl"] >= 0


def test_threads_follow_the_ranks_cpus(tiny_models):
    import os

    before = torch.get_num_threads()
    try:
        make_learner(tiny_models["qwen2-vl"], num_threads=None, cpus_per_rank=3, beta=0)
        assert torch.get_num_threads() == 3 != (os.cpu_count() or 1)  # not the machine's cores
        make_learner(tiny_models["qwen2-vl"], num_threads=None, cpus_per_rank=0.5, beta=0)
        assert torch.get_num_threads() == 1
        make_learner(tiny_models["qwen2-vl"], num_threads=2, cpus_per_rank=3, beta=0)
        assert torch.get_num_threads() == 2  # an explicit num_threads wins
    finally:
        torch.set_num_threads(before)


def test_tied_model_syncs_into_the_engine_and_round_trips(tied_path, tmp_path):
    from vlgrpo.modules import resolve_module
    from vlgrpo.rollout.engine import tensor_checksum
    from vlgrpo.rollout.hf_engine import TransformersEngine

    learner = make_learner(tied_path, lr=1e-2, beta=0)
    assert learner.model.lm_head.weight is learner.model.get_input_embeddings().weight
    names = [n for n, *_ in learner.weights_meta()]
    emb = "model.embed_tokens.weight"
    assert emb in names and "lm_head.weight" not in names  # the tie is sent once, as the embeddings
    assert names == [n for n, _ in learner.named_weights()] and set(names) == set(learner.trainable_names())
    learner.train_step(make_batch(learner.module, learner.processor))
    w = weights(learner)

    engine = TransformersEngine(tied_path, resolve_module(tied_path))
    head = engine.model.lm_head.weight
    assert head is engine.model.get_input_embeddings().weight
    assert not torch.equal(head, learner.model.lm_head.weight)  # control: the update moved it
    assert engine.load_weights(learner.named_weights(), version=1) == len(names)
    assert engine.weights_checksum(names) == {n: tensor_checksum(w[n]) for n in names}
    # tied in the engine too: lm_head (never sent) is the learner's trained lm_head
    assert head is engine.model.get_input_embeddings().weight
    assert torch.equal(head, learner.model.lm_head.weight) and torch.equal(head, w[emb])

    out = learner.save_pretrained(str(tmp_path / "policy"))
    loaded = learner.module.get_model_class(out, {}).from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.get_input_embeddings().weight
    mb = learner.to_device(learner.micro_batches(make_batch(learner.module, learner.processor, seed=1))[0])
    learner.model.eval()
    with torch.no_grad():
        ref, got = learner.model(**mb.inputs).logits, loaded(**mb.inputs).logits
        eng = engine.model(**mb.inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eng, ref, atol=1e-5, rtol=1e-5)
