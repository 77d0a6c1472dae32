"""Atomic writes, checkpoint commit/latest/pruning, and the safetensors HF policy round trip."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from vlgrpo.cluster import checkpoint as ck
from vlgrpo.cluster.checkpoint import (CheckpointManager, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                       capture_rng_state, config_hash, load_safetensors, load_trainer_state,
                                       resolve_checkpoint, restore_rng_state, save_hf_policy, save_safetensors)


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def test_atomic_write_roundtrip(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"b": 1, "a": [1.5, "x"], "p": tmp_path})
    assert json.loads(p.read_text()) == {"a": [1.5, "x"], "b": 1, "p": str(tmp_path)}
    atomic_write_text(p, "hello")
    assert p.read_text() == "hello"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(p.parent)) == ["a.json"]  # no temp files left


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_atomic_write_keeps_old_content_when_writer_crashes(tmp_path, monkeypatch, where):
    p = tmp_path / "state.json"
    atomic_write_json(p, {"step": 1})

    def boom(*a, **k):
        raise OSError("simulated crash")

    monkeypatch.setattr(ck.os, where, boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_json(p, {"step": 2})
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_json_rejects_unserialisable_before_touching_file(tmp_path):
    p = tmp_path / "s.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}


# ------------------------------------------------------------------------------------------------
# checkpoint manager
# ------------------------------------------------------------------------------------------------
def _commit(mgr: CheckpointManager, step: int, **state) -> "os.PathLike":
    tmp = mgr.begin(step)
    assert tmp.name == f"step_{step:06d}.tmp" and (tmp / "learner").is_dir()
    (tmp / "learner" / "optim.bin").write_bytes(b"x" * 10)  # the learner fills learner/
    mgr.write_trainer_state(tmp, {"step": step, "weights_version": step, **state})
    return mgr.commit(step, tmp)


def test_commit_latest_and_incomplete_checkpoints_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    assert mgr.latest() is None
    d10 = _commit(mgr, 10, sampler={"epoch": 0, "index": 40})
    assert d10 == tmp_path / "checkpoints" / "step_000010"
    d20 = _commit(mgr, 20)
    assert mgr.latest() == d20 and mgr.latest_step() == 20
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000020"
    assert load_trainer_state(d10)["sampler"] == {"epoch": 0, "index": 40}
    assert (d20 / "learner" / "optim.bin").exists()

    # a crash while writing step 30: the .tmp dir is left behind and ignored
    tmp30 = mgr.begin(30)
    mgr.write_trainer_state(tmp30, {"step": 30})
    assert mgr.latest() == d20
    # a step dir without a (valid) trainer_state.json is not a checkpoint either
    (tmp_path / "checkpoints" / "step_000040").mkdir()
    (tmp_path / "checkpoints" / "step_000050").mkdir()
    (tmp_path / "checkpoints" / "step_000050" / "trainer_state.json").write_text('{"step": 5')
    assert mgr.latest() == d20
    assert resolve_checkpoint(tmp_path) == d20
    assert resolve_checkpoint(tmp_path / "checkpoints") == d20
    assert resolve_checkpoint(d10) == d10
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(tmp30)
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "nothing")

    # begin() again for the same step starts afresh; commit cleans leftovers
    tmp30 = mgr.begin(30)
    assert list(tmp30.iterdir()) == [tmp30 / "learner"]
    mgr.write_trainer_state(tmp30, {"step": 30})
    with pytest.warns(UserWarning, match="later step"):  # the stray step_000040/50 dirs are removed
        d30 = mgr.commit(30, tmp30)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step_000010", "step_000020", "step_000030"]
    assert mgr.latest() == d30 and not tmp30.exists()


def test_failed_save_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    d10 = mgr.save(10, {"weights_version": 1}, learner_writer=lambda d: (d / "s.txt").write_text("ok"))

    def crashing_writer(d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        mgr.save(20, {"weights_version": 2}, policy_writer=crashing_writer)
    assert mgr.latest() == d10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000010"]

    # commit refuses a checkpoint without trainer_state.json
    tmp = mgr.begin(20)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        mgr.commit(20, tmp)
    assert mgr.latest() == d10


def test_keep_last_pruning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        _commit(mgr, step)
    assert [s for s, _ in mgr.list_checkpoints()] == [30, 40]
    mgr1 = CheckpointManager(tmp_path, keep_last=1)
    _commit(mgr1, 50)  # the one just committed is never deleted
    assert [s for s, _ in mgr1.list_checkpoints()] == [50]
    (tmp_path / "checkpoints" / "step_000045").mkdir()  # incomplete, older: removed at the next commit
    _commit(mgr1, 60)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000060"]
    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for step in (1, 2, 3, 4):
        _commit(keep_all, step)
    assert [s for s, _ in keep_all.list_checkpoints()] == [1, 2, 3, 4]


def test_commit_after_resume_from_earlier_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (10, 20, 30):
        _commit(mgr, step, weights_version=step)
    # resumed from step 10: step 20 is written again (replaced), 30 belongs to the abandoned run
    with pytest.warns(UserWarning, match="later step"):
        d20 = _commit(mgr, 20, run="second")
    assert load_trainer_state(d20)["run"] == "second"
    assert [s for s, _ in mgr.list_checkpoints()] == [10, 20]
    assert mgr.latest() == d20
    with pytest.raises(ValueError, match="says step"):
        tmp = mgr.begin(60)
        mgr.write_trainer_state(tmp, {"step": 61})
        mgr.commit(60, tmp)


def test_rng_state_roundtrip_through_json(tmp_path):
    np = pytest.importorskip("numpy")
    state = json.loads(json.dumps(capture_rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_save_safetensors_clones_shared_tensors(tmp_path):
    w = torch.randn(4, 3)
    fused = torch.randn(6, 3)
    tensors = {"embed.weight": w, "lm_head.weight": w, "q": fused[:3], "k": fused[3:], "t": torch.randn(3, 4).t()}
    path = save_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_safetensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v)


# ------------------------------------------------------------------------------------------------
# policy in Hugging Face format
# ------------------------------------------------------------------------------------------------
def _inputs(processor):
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (56, 56), (255, 0, 0))], return_tensors="pt")


def test_save_hf_policy_roundtrip(qwen2_vl_path, tmp_path):
    from safetensors import safe_open

    from vlgrpo.modules import get_module
    from vlgrpo.modules.loading import load_model_and_processor

    module = get_module("qwen")
    src = qwen2_vl_path
    model, processor = load_model_and_processor(str(src), module)
    inputs = _inputs(processor)
    with torch.no_grad():
        before = model(**inputs).logits
        g = torch.Generator().manual_seed(123)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        expected = model(**inputs).logits
    assert not torch.allclose(before, expected)

    out = tmp_path / "ckpt" / "policy"
    save_hf_policy(model.state_dict().items(), src, out)
    names = sorted(os.listdir(out))
    assert "model.safetensors" in names and "config.json" in names and "generation_config.json" in names
    assert "tokenizer.json" in names and "processor_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth")) or n.startswith(".")]
    assert not [n for n in os.listdir(out.parent) if n != "policy"]  # staging dir renamed away
    # written in the source checkpoint's tensor names (what vLLM and hub checkpoints use)
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(src / "model.safetensors"), "pt") as s:
        assert set(f.keys()) == set(s.keys())
        assert f.metadata().get("format") == "pt"

    reloaded, processor2 = load_model_and_processor(str(out), module)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    assert torch.equal(got, expected)
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

    # checkpoint names (as the learner's named_weights yields them) give the same files; saving over
    # an existing policy replaces it
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        ck_items = [(k, f.get_tensor(k) * 0 + 1) for k in f.keys()]
    save_hf_policy(ck_items, src, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(torch.all(f.get_tensor(k) == 1) for k in f.keys())

    # the manager's model + processor path (save_pretrained into a staging dir, renamed)
    mgr = CheckpointManager(tmp_path / "run")
    d = mgr.save(1, {"weights_version": 1}, model=model, processor=processor)
    pol = d / "policy"
    assert (pol / "model.safetensors").exists() and (pol / "tokenizer.json").exists()
    assert not list(pol.glob("*.bin"))
    reloaded2, _ = load_model_and_processor(str(pol), module)
    with torch.no_grad():
        assert torch.equal(reloaded2(**inputs).logits, expected)


def test_save_hf_policy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        save_hf_policy([("a", torch.zeros(1))], tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="empty"):
        save_hf_policy([], tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="meta"):
        save_hf_policy([("a", torch.empty(2, device="meta"))], tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
