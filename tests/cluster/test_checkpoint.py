"""Atomic writes, the step_N.tmp -> step_N commit protocol, latest, keep_last rotation, moving
earlier checkpoints aside (never deleting them) and resolve_checkpoint."""
from __future__ import annotations

import json
import os
import stat
import warnings
from pathlib import Path

import pytest

from vlgrpo.cluster import checkpoint as ck
from vlgrpo.cluster.checkpoint import (CheckpointManager, atomic_write_bytes, atomic_write_json, atomic_write_text,
                                       is_complete_checkpoint, load_trainer_state, resolve_checkpoint)


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
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # the usual mode, not mkstemp's 0600


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


def test_atomic_write_keeps_old_content_when_write_fails_midway(tmp_path, monkeypatch):
    p = tmp_path / "m.bin"
    atomic_write_bytes(p, b"old content")
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:3])
            self.f.flush()
            raise OSError("disk full")

    monkeypatch.setattr(ck.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(p, b"new content")
    assert p.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["m.bin"]


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    kinds = []
    real_fsync = os.fsync

    def spy(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", spy)
    atomic_write_text(tmp_path / "x.txt", "x")
    assert kinds == ["file", "dir"]  # the data, then the directory entry of the rename


def test_atomic_write_json_rejects_unserialisable_before_touching_file(tmp_path):
    p = tmp_path / "s.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["s.json"]


# ------------------------------------------------------------------------------------------------
# checkpoint manager
# ------------------------------------------------------------------------------------------------
def _fill(tmp: Path, step: int, tag: str = "", **state) -> None:
    """What the controller does between begin and commit."""
    (tmp / "learner" / "optim.bin").write_bytes(f"optim {step} {tag}".encode() * 100)  # the learner fills learner/
    (tmp / "policy").mkdir()
    (tmp / "policy" / "model.safetensors").write_bytes(os.urandom(256))
    atomic_write_json(tmp / "trainer_state.json", {"step": step, "weights_version": step, "tag": tag, **state})


def _commit(mgr: CheckpointManager, step: int, tag: str = "", **state) -> Path:
    tmp = mgr.begin(step)
    assert tmp.name == f"step_{step:06d}.tmp" and sorted(os.listdir(tmp)) == ["learner"]
    _fill(tmp, step, tag, **state)
    return mgr.commit(step, tmp)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _names(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def test_commit_latest_and_incomplete_checkpoints_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    assert mgr.latest() is None and mgr.list_checkpoints() == []
    d10 = _commit(mgr, 10, sampler={"epoch": 0, "index": 40})
    assert d10 == tmp_path / "checkpoints" / "step_000010" and is_complete_checkpoint(d10)
    d20 = _commit(mgr, 20)
    assert mgr.latest() == d20 and [s for s, _ in mgr.list_checkpoints()] == [10, 20]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000020\n"
    assert load_trainer_state(d10)["sampler"] == {"epoch": 0, "index": 40}
    assert (d20 / "learner" / "optim.bin").exists() and (d20 / "policy" / "model.safetensors").exists()
    assert _names(tmp_path / "checkpoints") == ["latest", "step_000010", "step_000020"]

    # step dirs without a (valid) trainer_state.json are not checkpoints
    root = tmp_path / "checkpoints"
    (root / "step_000040").mkdir()
    (root / "step_000050").mkdir()
    (root / "step_000050" / "trainer_state.json").write_text('{"step": 5')
    (root / "step_000060").mkdir()
    (root / "step_000060" / "trainer_state.json").write_text("[1, 2]")
    assert mgr.latest() == d20
    assert [s for s, _ in mgr.list_checkpoints(complete_only=False)] == [10, 20, 40, 50, 60]
    for s in (40, 50, 60):
        assert not is_complete_checkpoint(root / f"step_{s:06d}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trainer_state(root / "step_000050")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_trainer_state(root / "step_000060")


def test_crash_between_begin_and_commit_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    d10 = _commit(mgr, 10, tag="good")
    before = _snapshot(d10)
    tmp20 = mgr.begin(20)
    _fill(tmp20, 20)  # complete, even with its trainer_state.json, but never committed
    # the process dies here; a new one looks at the output directory
    again = CheckpointManager(tmp_path, keep_last=3)
    assert again.latest() == d10 and resolve_checkpoint(tmp_path) == d10
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000010\n"
    assert _snapshot(d10) == before
    # begin() for the same step starts afresh (the leftover .tmp was never committed)
    tmp20 = again.begin(20)
    assert sorted(os.listdir(tmp20)) == ["learner"] and not (tmp20 / "learner" / "optim.bin").exists()
    # a leftover .tmp of an earlier step is removed by the next commit
    stale = again.begin(15)
    _fill(tmp20, 20)
    d20 = again.commit(20, tmp20)
    assert not stale.exists() and not tmp20.exists()
    assert again.latest() == d20 and _names(tmp_path / "checkpoints") == ["latest", "step_000010", "step_000020"]


def test_crash_inside_commit_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    d10 = _commit(mgr, 10)
    before = _snapshot(d10)
    tmp = mgr.begin(20)
    _fill(tmp, 20)
    real_replace = os.replace

    def crash_on_publish(src, dst):
        if str(src).endswith("step_000020.tmp"):
            raise OSError("killed during commit")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_publish)
    with pytest.raises(OSError, match="killed"):
        mgr.commit(20, tmp)
    monkeypatch.undo()
    assert mgr.latest() == d10 and _snapshot(d10) == before
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000010\n"
    assert not (tmp_path / "checkpoints" / "step_000020").exists()


@pytest.mark.parametrize("fsync", [True, False])
def test_commit_fsyncs_the_checkpoint_before_publishing_it(tmp_path, monkeypatch, fsync):
    mgr = CheckpointManager(tmp_path, keep_last=2, fsync=fsync)
    tmp = mgr.begin(1)
    _fill(tmp, 1)
    synced = []
    monkeypatch.setattr(ck, "_fsync", lambda p: synced.append((os.fspath(p), os.path.exists(tmp))))
    mgr.commit(1, tmp)
    in_tmp = {os.path.relpath(p, tmp) for p, tmp_still_there in synced if p.startswith(str(tmp)) and tmp_still_there}
    expected = {"learner/optim.bin", "policy/model.safetensors", "trainer_state.json", ".", "learner", "policy"}
    assert in_tmp == (expected if fsync else set())
    assert (os.fspath(tmp_path / "checkpoints"), False) in synced  # the rename itself is made durable


def test_commit_refuses_bad_input(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    d10 = _commit(mgr, 10)
    tmp = mgr.begin(20)
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):  # no trainer state: not publishable
        mgr.commit(20, tmp)
    atomic_write_json(tmp / "trainer_state.json", {"step": 21})
    with pytest.raises(ValueError, match="says step 21"):
        mgr.commit(20, tmp)
    with pytest.raises(ValueError, match="expects"):
        mgr.commit(30, tmp)
    with pytest.raises(ValueError, match="step must be >= 0"):
        mgr.begin(-1)
    with pytest.raises(FileNotFoundError, match="call begin"):
        mgr.commit(40, tmp_path / "checkpoints" / "step_000040.tmp")
    assert mgr.latest() == d10 and [s for s, _ in mgr.list_checkpoints()] == [10]


def test_keep_last_rotation(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        _commit(mgr, step)
    assert [s for s, _ in mgr.list_checkpoints()] == [30, 40]
    assert _names(tmp_path / "checkpoints") == ["latest", "step_000030", "step_000040"]  # no .tmp residue

    one = CheckpointManager(tmp_path / "one", keep_last=1)
    for step in (1, 2, 3):
        d = _commit(one, step)
        assert [s for s, _ in one.list_checkpoints()] == [step] and one.latest() == d  # the new one is kept

    for keep in (0, None):
        keep_all = CheckpointManager(tmp_path / f"all-{keep}", keep_last=keep)
        for step in (1, 2, 3, 4):
            _commit(keep_all, step)
        assert [s for s, _ in keep_all.list_checkpoints()] == [1, 2, 3, 4]


def test_rotation_crash_midway_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    _commit(mgr, 1)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda *a, **k: None)  # the process dies before deleting
    d2 = _commit(mgr, 2)
    monkeypatch.undo()
    # the rotated checkpoint was renamed to a .tmp first: it can never be taken for a checkpoint
    assert _names(tmp_path / "checkpoints") == ["latest", "step_000001.tmp", "step_000002"]
    assert mgr.latest() == d2
    d3 = _commit(CheckpointManager(tmp_path, keep_last=1), 3)
    assert _names(tmp_path / "checkpoints") == ["latest", "step_000002", "step_000003"]
    assert resolve_checkpoint(tmp_path) == d3


def test_rotation_only_deletes_this_runs_checkpoints(tmp_path):
    first = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        _commit(first, step, tag="first")
    kept = {s: _snapshot(p) for s, p in first.list_checkpoints()}
    assert sorted(kept) == [2, 3]
    root = tmp_path / "checkpoints"
    (root / "step_000000").mkdir()  # a step dir that is not a complete checkpoint: not ours either
    (root / "step_000000" / "notes.txt").write_text("keep me")

    # a second run resumes from step 3 and rotates only what it committed itself
    second = CheckpointManager(tmp_path, keep_last=2)
    for step in (4, 5, 6, 7):
        _commit(second, step, tag="second")
    assert [s for s, _ in second.list_checkpoints()] == [2, 3, 6, 7]
    assert {s: _snapshot(root / f"step_{s:06d}") for s in (2, 3)} == kept
    assert (root / "step_000000" / "notes.txt").read_text() == "keep me"
    assert second.latest() == root / "step_000007"


def test_recommit_of_existing_step_moves_old_checkpoint_aside(tmp_path):
    root = tmp_path / "checkpoints"
    first = CheckpointManager(tmp_path, keep_last=3)
    for step in (10, 20):
        _commit(first, step, tag="first")
    old10, old20 = _snapshot(root / "step_000010"), _snapshot(root / "step_000020")

    # a re-run into the same output directory: begin() alone leaves every committed dir as it was
    second = CheckpointManager(tmp_path, keep_last=3)
    tmp = second.begin(10)
    assert _snapshot(root / "step_000010") == old10 and _snapshot(root / "step_000020") == old20
    assert second.latest() == root / "step_000020"
    _fill(tmp, 10, tag="second")
    with pytest.warns(UserWarning) as record:
        d10 = second.commit(10, tmp)
    messages = " ".join(str(w.message) for w in record)
    assert "already existed" in messages and "later step" in messages
    assert load_trainer_state(d10)["tag"] == "second"
    # the first run's step 10 and (later) step 20 are still on disk, byte for byte
    assert _names(root) == ["latest", "step_000010", "step_000010.prev-1", "step_000020.prev-1"]
    assert _snapshot(root / "step_000010.prev-1") == old10
    assert _snapshot(root / "step_000020.prev-1") == old20
    # .prev-K folders are never checkpoints for latest/list_checkpoints
    assert second.latest() == d10 and second.list_checkpoints(complete_only=False) == [(10, d10)]
    assert not is_complete_checkpoint(root / "step_000010.prev-1")
    assert resolve_checkpoint(tmp_path) == d10
    # ... but an explicit --resume of one is honoured
    assert resolve_checkpoint(root / "step_000010.prev-1") == root / "step_000010.prev-1"

    # a third run: first free K; and rotation (keep_last=1) never touches .prev-K folders
    new10 = _snapshot(d10)
    third = CheckpointManager(tmp_path, keep_last=1)
    with pytest.warns(UserWarning, match="already existed"):
        _commit(third, 10, tag="third")
    assert _snapshot(root / "step_000010.prev-2") == new10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing else is moved or warned about
        for step in (20, 30, 40):
            _commit(third, step, tag="third")
    assert _names(root) == ["latest", "step_000010.prev-1", "step_000010.prev-2", "step_000020.prev-1",
                            "step_000040"]
    assert _snapshot(root / "step_000010.prev-1") == old10
    assert _snapshot(root / "step_000010.prev-2") == new10
    assert _snapshot(root / "step_000020.prev-1") == old20
    assert third.latest() == root / "step_000040"


def test_commit_after_resume_from_earlier_step(tmp_path):
    root = tmp_path / "checkpoints"
    first = CheckpointManager(tmp_path, keep_last=5)
    for step in (10, 20, 30):
        _commit(first, step, tag="first")
    old = {s: _snapshot(p) for s, p in first.list_checkpoints()}
    # resumed from step 10: step 20 is written again; 30 belongs to the abandoned timeline
    second = CheckpointManager(tmp_path, keep_last=5)
    with pytest.warns(UserWarning) as record:
        d20 = _commit(second, 20, tag="second")
    assert sorted("later step" in str(w.message) for w in record) == [False, True]  # + "already existed"
    assert load_trainer_state(d20)["tag"] == "second"
    assert [s for s, _ in second.list_checkpoints()] == [10, 20]
    assert second.latest() == d20 and resolve_checkpoint(tmp_path) == d20
    assert (root / "latest").read_text() == "step_000020\n"
    assert _snapshot(root / "step_000010") == old[10]
    assert _snapshot(root / "step_000020.prev-1") == old[20]
    assert _snapshot(root / "step_000030.prev-1") == old[30]


# ------------------------------------------------------------------------------------------------
# resolve_checkpoint (--resume DIR)
# ------------------------------------------------------------------------------------------------
def test_resolve_checkpoint(tmp_path):
    out = tmp_path / "run"
    mgr = CheckpointManager(out, keep_last=3)
    d1, d2 = _commit(mgr, 1), _commit(mgr, 2)
    tmp3 = mgr.begin(3)
    _fill(tmp3, 3)
    assert resolve_checkpoint(out) == d2                     # a run's output directory: its newest
    assert resolve_checkpoint(str(out)) == d2
    assert resolve_checkpoint(out / "checkpoints") == d2     # its checkpoints directory
    assert resolve_checkpoint(d1) == d1                      # a checkpoint directory itself
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(tmp3)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint.*output directory"):
        resolve_checkpoint(empty)
    (empty / "checkpoints" / "step_000005").mkdir(parents=True)  # only an incomplete one
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="no such file or directory.*output directory"):
        resolve_checkpoint(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_checkpoint(bad)
