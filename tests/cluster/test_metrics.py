"""metrics.jsonl, TensorBoard, W&B (fake module), the PNG plot, resume / move-aside and progress output."""
from __future__ import annotations

import importlib.machinery
import io
import json
import logging
import math
import re
import sys
import types

import pytest

from vlgrpo.cluster import metrics as M
from vlgrpo.cluster.metrics import MetricsConfig, MetricsLogger, plot_keys, plot_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_TB = MetricsConfig(tensorboard=False, plot_keys=["reward/mean"])  # one subplot: quick to draw


def _metrics(step: int) -> dict:
    return {"reward/mean": 0.1 * step, "reward/accuracy": 0.05 * step, "reward/format": 1.0,
            "loss/total": -0.01 * step, "policy/kl": 0.001 * step, "time/step_s": 1.5}


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_jsonl_one_object_per_step(tmp_path, monkeypatch):
    import numpy as np
    import torch

    log = MetricsLogger(tmp_path, NO_TB, total_steps=3)
    synced, fsync = [], M.os.fsync
    monkeypatch.setattr(M.os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    for step in range(1, 4):
        extra = {"policy/clip_frac": np.float32(0.25), "response_length/mean": torch.tensor(12.0),
                 "data/count": np.int64(step), "x/nan": float("nan"), "x/inf": float("-inf"),
                 "x/flag": True, "x/none": None, "step": 999}
        log.log(step, {**_metrics(step), **extra})
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step  # flushed per line
        assert synced == [log._file.fileno()] * step  # and fsynced
    log.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    for step, line in enumerate(lines, start=1):
        assert "NaN" not in line and "Infinity" not in line  # strict JSON
        obj = json.loads(line)
        assert list(obj)[0] == "step" and obj["step"] == step  # the "step" metric does not override it
        assert list(obj)[1:] == sorted(k for k in obj if k != "step")
        assert obj["x/nan"] is None and obj["x/inf"] is None and obj["x/none"] is None
        assert obj["x/flag"] == 1 and type(obj["x/flag"]) is int
        assert obj["data/count"] == step and type(obj["data/count"]) is int
        assert obj["policy/clip_frac"] == 0.25 and obj["response_length/mean"] == 12.0
    assert json.loads(lines[0]) == {
        "step": 1, "data/count": 1, "loss/total": -0.01, "policy/clip_frac": 0.25, "policy/kl": 0.001,
        "response_length/mean": 12.0, "reward/accuracy": 0.05, "reward/format": 1.0, "reward/mean": 0.1,
        "time/step_s": 1.5, "x/flag": 1, "x/inf": None, "x/nan": None, "x/none": None}
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert math.isnan(recs[0]["x/nan"]) and recs[2]["reward/mean"] == pytest.approx(0.3)


def test_ungrouped_and_non_numeric_keys_warn_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vlgrpo.cluster.metrics")
    with MetricsLogger(tmp_path, NO_TB, total_steps=2) as log:
        rec = log.log(1, {"reward/mean": 1.0, "weights_version": 3, "run/mode": "async", "step": 1})
        assert rec == {"step": 1, "reward/mean": 1.0, "weights_version": 3}  # ungrouped kept, text dropped
        msgs = sorted(r.getMessage() for r in caplog.records)
        assert len(msgs) == 2
        assert "'run/mode' = 'async' is not a number" in msgs[0] and "'weights_version' has no group" in msgs[1]
        log.log(2, {"reward/mean": 1.0, "weights_version": 4, "run/mode": "async"})
        assert len(caplog.records) == 2  # once per key
    assert [r.get("weights_version") for r in read_metrics(tmp_path / "metrics.jsonl")] == [3, 4]


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": null}\n{"step": 3, "rew')
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2] and math.isnan(recs[1]["reward/mean"])
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_resume_drops_later_steps_and_appends(tmp_path):
    with MetricsLogger(tmp_path, NO_TB, total_steps=5) as log:
        for step in range(1, 6):
            log.log(step, _metrics(step))
    path = tmp_path / "metrics.jsonl"
    kept = path.read_text().splitlines()[:3]
    with open(path, "a") as f:
        f.write('not json\n{"step": 6, "reward')  # a corrupt line, then a crash mid-line

    log = MetricsLogger(tmp_path, NO_TB, total_steps=5, resume_from_step=3)
    assert path.read_text().splitlines() == kept  # steps 1..3 as written, nothing else
    log.log(4, {**_metrics(4), "reward/mean": 9.0})
    log.close()
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["reward/mean"] == 9.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]  # no temp / prev files


def test_fresh_run_moves_old_jsonl_aside(tmp_path):
    old = b'{"step": 7, "reward/mean": 1.0}\n{"step": 8, "rew'
    (tmp_path / "metrics.jsonl").write_bytes(old)
    (tmp_path / "metrics.jsonl.prev-1").write_bytes(b"older\n")
    with MetricsLogger(tmp_path, NO_TB, total_steps=1) as log:
        log.log(1, _metrics(1))
    assert (tmp_path / "metrics.jsonl.prev-1").read_bytes() == b"older\n"
    assert (tmp_path / "metrics.jsonl.prev-2").read_bytes() == old  # byte for byte
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    (tmp_path / "metrics.jsonl").write_text("")  # an empty file is simply reused
    MetricsLogger(tmp_path, NO_TB, total_steps=1).close()
    assert not (tmp_path / "metrics.jsonl.prev-3").exists()


def _scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], set(acc.Tags()["scalars"])


def test_tensorboard_events_resume_and_move_aside(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = MetricsConfig(tensorboard="auto", plot_keys=["reward/mean"])
    log = MetricsLogger(tmp_path, cfg, total_steps=3)
    for step in range(1, 4):
        log.log(step, {**_metrics(step), "weights_version": step})
    values, tags = _scalars(tmp_path / "tensorboard", "reward/mean")
    assert {"reward/mean", "reward/accuracy", "loss/total", "weights_version"} <= tags
    assert values == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    log.close()

    # resume from step 2: TensorBoard drops the old step 3 (purge_step) and takes the new one
    with MetricsLogger(tmp_path, cfg, total_steps=3, resume_from_step=2) as log:
        log.log(3, {**_metrics(3), "reward/mean": 9.0})
    assert _scalars(tmp_path / "tensorboard", "reward/mean")[0] == [
        (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, 9.0)]
    assert not (tmp_path / "tensorboard.prev-1").exists()

    # a fresh run moves the old events aside (kept byte for byte) instead of mixing them in
    before = _snapshot(tmp_path / "tensorboard")
    log = MetricsLogger(tmp_path, MetricsConfig(tensorboard=True, plot_keys=["reward/mean"]), total_steps=1)
    log.log(1, {"reward/mean": 5.0})
    assert _snapshot(tmp_path / "tensorboard.prev-1") == before
    assert _scalars(tmp_path / "tensorboard", "reward/mean")[0] == [(1, 5.0)]  # readable while running
    log.close()
    assert _scalars(tmp_path / "tensorboard.prev-1", "reward/mean")[0][-1] == (3, 9.0)


def test_tensorboard_off_or_missing(tmp_path, monkeypatch):
    MetricsLogger(tmp_path / "off", NO_TB, total_steps=1).close()
    assert not (tmp_path / "off" / "tensorboard").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    MetricsLogger(tmp_path / "auto", MetricsConfig(tensorboard="auto"), total_steps=1).close()
    assert not (tmp_path / "auto" / "tensorboard").exists()
    with pytest.raises(ValueError, match=r"metrics\.tensorboard=true .*pip install tensorboard"):
        MetricsConfig(tensorboard=True)


def test_plot_keys_defaults_in_order():
    recs = [{"step": 1, "time/step_s": 1.0, "staleness/mean": 0.0, "reward/std": 0.1, "reward/max": 1.0,
             "reward/median": 0.5, "reward/min": 0.0, "reward/format": 1.0, "reward/mean": 0.5,
             "reward/accuracy": 0.25, "reward/length": float("nan"), "policy/entropy": 2.0, "policy/kl": 0.1,
             "loss/total": 0.3, "sync/mb_per_s": 10.0, "custom/thing": 1.0, "response_length/mean": 7.0},
            {"step": 2, "reward/answer": 0.5, "policy/clip_frac": 0.1}]
    assert plot_keys(recs) == ["reward/accuracy", "reward/mean", "reward/answer", "reward/format", "loss/total",
                               "policy/kl", "policy/clip_frac", "policy/entropy", "response_length/mean",
                               "time/step_s", "sync/mb_per_s", "staleness/mean"]
    assert plot_keys([{"step": 1, "reward/mean": 1.0, "time/step_s": 2.0}]) == ["reward/mean", "time/step_s"]
    assert plot_keys([]) == []


@pytest.fixture
def titles(monkeypatch):
    """Subplot titles of every figure saved (the PNG itself cannot tell them)."""
    from matplotlib.figure import Figure

    seen, save = [], Figure.savefig

    def spy(fig, *a, **kw):
        seen.append([ax.get_title() for ax in fig.axes])
        return save(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def test_close_writes_png_plot(tmp_path, titles):
    log = MetricsLogger(tmp_path, MetricsConfig(tensorboard=False), total_steps=45)
    for step in range(1, 46):  # > 40 points: the smoothed curve is drawn too
        log.log(step, {**_metrics(step), "reward/std": 0.1, "sync/mb_per_s": 100.0, "custom/x": 1.0})
    png = log.close()
    assert png == tmp_path / "metrics.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert titles == [["reward/accuracy", "reward/mean", "reward/format", "loss/total", "policy/kl",
                       "time/step_s", "sync/mb_per_s"]]
    assert log.close() is None and len(titles) == 1  # idempotent

    cfg = MetricsConfig(tensorboard=False, plot_keys=["custom/x", "loss/total"])
    with MetricsLogger(tmp_path / "custom", cfg, total_steps=2) as log:
        log.log(1, {"custom/x": 1.0, "loss/total": 0.5, "reward/mean": 0.1})
    assert titles[-1] == ["custom/x", "loss/total"]
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_progress_lines_without_tty(tmp_path, capsys, monkeypatch):
    clock = iter(range(0, 1000, 2))  # each monotonic() call advances 2 s
    monkeypatch.setattr(M, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    with MetricsLogger(tmp_path, NO_TB, total_steps=20) as log:  # default: every 20 // 10 = 2 steps
        for step in range(1, 21):
            log.log(step, {"reward/accuracy": 0.75, "reward/mean": 0.8125, "loss/total": 0.0123,
                           "time/step_s": 1.234, "policy/kl": 0.5})
        log.write("a message")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "step 2/20 | acc 0.750 | reward 0.812 | loss 0.0123 | 1.23 s/step | eta 0:00:18"
    assert [line.split(" | ")[0] for line in lines[:-1]] == [f"step {s}/20" for s in range(2, 21, 2)]
    assert lines[-2].endswith("eta 0:00:00") and lines[-1] == "a message"


def test_progress_every_resume_and_missing_keys(tmp_path, capsys):
    cfg = MetricsConfig(tensorboard=False, progress_every=7)
    with MetricsLogger(tmp_path, cfg, total_steps=20, resume_from_step=5) as log:
        for step in range(6, 21):
            log.log(step, {"reward/mean": 0.5} if step < 20 else {"loss/total": 2.0})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and not any("\r" in line for line in lines)
    assert re.fullmatch(r"step 7/20 \| reward 0\.500 \| eta \d+:\d\d:\d\d", lines[0])
    assert lines[1].startswith("step 14/20 | reward 0.500 | eta ")
    assert lines[2] == "step 20/20 | loss 2 | eta 0:00:00"


def test_progress_bar_on_tty(tmp_path, monkeypatch):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", TTY())
    with MetricsLogger(tmp_path, NO_TB, total_steps=4, resume_from_step=1) as log:
        for step in range(2, 5):
            log.log(step, {**_metrics(step), "reward/mean": 0.25})
            assert log.bar.n == step
        log.write("between")
    text = sys.stderr.getvalue()
    assert "train" in text and "4/4" in text and "between\n" in text
    assert "acc 0.200, reward 0.250, loss -0.04, 1.50 s/step" in text


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((dict(data), step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_wandb_fake_module(tmp_path, fake_wandb):
    cfg = MetricsConfig(tensorboard=False, wandb=True, wandb_project="demo")
    with MetricsLogger(tmp_path, cfg, total_steps=3, run_config={"trainer": {"lr": 1e-6}}) as log:
        log.log(1, {"reward/mean": 0.5, "x/nan": float("nan")})
        log.log(2, {"reward/mean": 0.75})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    (run,) = fake_wandb
    assert run.init_kwargs == {"project": "demo", "mode": "offline", "dir": str(tmp_path),
                               "config": {"trainer": {"lr": 1e-6}}, "id": run_id, "resume": "allow"}
    assert run.logged == [({"reward/mean": 0.5}, 1), ({"reward/mean": 0.75}, 2)] and run.finished

    with MetricsLogger(tmp_path, cfg, total_steps=3, resume_from_step=2) as log:  # same W&B run
        log.log(3, {"reward/mean": 1.0})
    assert fake_wandb[1].init_kwargs["id"] == run_id and fake_wandb[1].logged == [({"reward/mean": 1.0}, 3)]

    MetricsLogger(tmp_path, cfg, total_steps=3).close()  # a fresh run: a new W&B run, old id kept aside
    assert fake_wandb[2].init_kwargs["id"] != run_id
    assert (tmp_path / "wandb_run_id").read_text().strip() == fake_wandb[2].init_kwargs["id"]
    assert (tmp_path / "wandb_run_id.prev-1").read_text().strip() == run_id


@pytest.mark.parametrize("kwargs, match", [
    ({"tensorboard": "yes"}, r"metrics\.tensorboard='yes': use auto, true or false"),
    ({"wandb_mode": "cloud"}, r"metrics\.wandb_mode='cloud': use offline or online"),
    ({"progress_every": -1}, r"metrics\.progress_every=-1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricsConfig(**kwargs)


def test_config_wandb_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"pip install wandb or set metrics\.wandb=false"):
        MetricsConfig(wandb=True)
    assert MetricsConfig().wandb is False and MetricsConfig(wandb_mode="online").tensorboard == "auto"
