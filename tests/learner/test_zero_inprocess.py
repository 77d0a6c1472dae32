"""One DeepSpeed rank in the test process (gloo on CPU, no Ray): ZeRO-3 weight export gathers
only the names asked for (and can be gathered whole before a sync sends), and bf16 learners with
fp32 master weights / gradient accumulation train under ZeRO-2 and ZeRO-3."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from .conftest import frozen_names, make_batch, make_learner

deepspeed = pytest.importorskip("deepspeed")


def _zero_learner(path, port, stage, **kw):
    from vlgrpo.learner.rank import Learner
    from .conftest import learner_configs

    opts = dict(zero_stage=stage, lr=1e-2, micro_batch_size=4, seed=0, num_threads=2, beta=0.0)
    opts.update(kw)
    return Learner(*learner_configs(path, "qwen2-vl", **opts), master_port=port)


@pytest.fixture()
def gathers(monkeypatch):
    """Every ``GatheredParameters`` entered: the numel of the parameters it gathers, in order
    (with ``events``: "gather" per call, for ordering checks)."""
    calls: list[int] = []
    orig = deepspeed.zero.GatheredParameters

    def spy(params, *a, **k):
        calls.append(sum(int(getattr(p, "ds_numel", p.numel())) for p in params))
        return orig(params, *a, **k)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", spy)
    return calls


def test_zero3_named_weights_filter_gathers_only_the_names(tiny_models, port, gathers):
    path = tiny_models["qwen2-vl"]
    learner = _zero_learner(path, port, 3, freeze_vision=True)
    assert all(p.numel() == 0 for p in learner.model.parameters())  # really partitioned
    trainable, frozen = learner.trainable_names(), set(frozen_names(learner))
    assert frozen and not frozen & set(trainable)

    full = list(learner.named_weights(bucket_numel=1))  # one gather per tensor
    gathered_full = sum(gathers)
    gathers.clear()
    want = set(trainable)
    filtered = list(learner.named_weights(bucket_numel=1, names=want))
    gathered_filtered = sum(gathers)

    # exactly the trainable tensors, in export order, equal to the unfiltered export and to the file
    assert [n for n, _ in filtered] == [n for n, _ in full if n in want]
    assert set(n for n, _ in filtered) == want
    full_d = dict(full)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        for n, t in filtered:
            assert torch.equal(t, full_d[n]) and torch.equal(t, f.get_tensor(n)), n
    # the frozen tower was not gathered: the filtered run gathered exactly the trainable numel
    numel = {n: t.numel() for n, t in full}
    frozen_numel = sum(numel[n] for n in frozen)
    assert gathered_filtered == sum(numel[n] for n in want) == gathered_full - frozen_numel
    assert frozen_numel > 0 and len(gathers) == len(want)

    # (b) gathered_weights: every gather done before the list comes back (a sync then sends with no
    # learner gather interleaved); the plain generator, the control, has gathered one tensor only
    n0 = len(gathers)
    got = learner.gathered_weights(names=want, device="cpu")
    assert sum(gathers[n0:]) == gathered_filtered
    assert [n for n, _ in got] == [n for n, _ in filtered]
    assert all(t.device.type == "cpu" and torch.equal(t, full_d[n]) for n, t in got)
    gen, n0 = learner.named_weights(bucket_numel=1, names=want), len(gathers)
    next(gen)
    assert len(gathers) - n0 == 1 and sum(gathers[n0:]) < gathered_filtered
    gen.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_trains_with_fp32_master_weights(tiny_models, port, stage):
    learner = _zero_learner(tiny_models["qwen2-vl"], port, stage, dtype="bf16", adam_eps=1e-2)
    assert learner.dtype == torch.bfloat16
    assert {p.dtype for p in learner.model.parameters()} == {torch.bfloat16}
    assert learner.engine.get_data_types() == (torch.bfloat16, torch.float32)  # fp32 gradient accumulation
    w0 = {n: t.float().clone() for n, t in learner.named_weights()}
    batch = make_batch(learner.module, learner.processor)
    for _ in range(2):
        m = learner.train_step(batch)
        assert math.isfinite(m["loss/total"]) and math.isfinite(m["optim/grad_norm"]) and m["optim/grad_norm"] > 0
        assert m["faults/nonfinite_micro_batches"] == 0
    w1 = {n: t.float().clone() for n, t in learner.named_weights()}
    moved = [n for n in learner.trainable_names() if not torch.equal(w0[n], w1[n])]
    assert len(moved) > len(w0) // 2
    # the optimizer steps fp32 masters (one element per trainable element on one rank), fp32 Adam state
    inner = learner.optimizer.optimizer
    masters = list(inner.state)  # (ZeRO-3 puts them in param_groups only while stepping)
    assert masters and {p.dtype for p in masters} == {torch.float32}
    assert sum(p.numel() for p in masters) == sum(t.numel() for n, t in w1.items() if n in learner.trainable_names())
    assert {inner.state[p]["exp_avg"].dtype for p in masters} == {torch.float32}
    # the bf16 weights are the masters rounded: the masters moved further than bf16 can show
    flat_masters = torch.cat([p.detach().reshape(-1) for p in masters])
    assert flat_masters.dtype == torch.float32 and not torch.equal(flat_masters, flat_masters.bfloat16().float())


def test_zero3_tied_embeddings_export_once_and_train(port, tmp_path):
    """Qwen2.5-VL-3B ties lm_head to the embeddings: under ZeRO-3 the export names the tie once
    (as the embeddings, with the full shape), the tensors are the checkpoint's, and it trains."""
    from vlgrpo.modules.tiny import build_tiny_model

    path = str(build_tiny_model("qwen2-vl", tmp_path / "tied", size="micro", tied=True))
    learner = _zero_learner(path, port, 3)
    meta = learner.weights_meta()
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert sorted(n for n, *_ in meta) == sorted(f.keys())
        assert "lm_head.weight" not in f.keys()
        w0 = dict(learner.named_weights())
        assert all(torch.equal(w0[n], f.get_tensor(n)) and tuple(w0[n].shape) == s for n, s, _ in meta)
    assert learner.model.lm_head.weight is learner.model.get_input_embeddings().weight
    learner.train_step(make_batch(learner.module, learner.processor))
    emb = "model.embed_tokens.weight"
    assert not torch.equal(dict(learner.named_weights(names={emb}))[emb], w0[emb])
