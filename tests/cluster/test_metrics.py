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
from vlgrpo.cluster.metrics import MetricsConfig, MetricsLogger, panels, plot_metrics, read_metrics

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


def test_panels_judge_a_run_at_a_glance():
    """Accuracy first (with val/accuracy), then rewards, zero-spread groups, entropy, grad norm, length, time;
    a curve equal to one already drawn, loss and flat late panels are left out."""
    recs = [{"step": s, "reward/accuracy": 0.1 * s, "reward/mean": 0.1 * s, "reward/format": 1.0, "reward/std": 0.1,
             "reward/zero_std_groups": 0.5, "policy/entropy": 2.0 - 0.1 * s, "optim/grad_norm": 1.0 + s,
             "response_length/mean": 3.0, "time/step_s": 2.0, "time/generate_s": 1.0, "time/update_s": 0.8,
             "loss/total": 1e-9 * s, "policy/clip_frac": 0.0, "policy/kl": 0.01 * s, "staleness/mean": 0.0,
             "faults/worker_replaced": float(s > 2), "sync/mb_per_s": 100.0 + s} for s in range(1, 5)]
    recs += [{"step": s, "val/accuracy": 0.2, "val/reward_mean": 0.2, "time/validate_s": 0.5} for s in (0, 4)]
    assert panels(recs) == [
        ("accuracy", ["reward/accuracy", "val/accuracy"]),
        ("reward by function", ["reward/format"]),  # reward/mean = reward/accuracy, val/reward_mean = val/accuracy
        ("groups with no reward spread (fraction)", ["reward/zero_std_groups"]),  # flat, but always shown
        ("policy/entropy", ["policy/entropy"]), ("optim/grad_norm", ["optim/grad_norm"]),
        ("response length (tokens)", ["response_length/mean"]),
        ("seconds per step, by phase", ["time/step_s", "time/generate_s", "time/update_s", "time/validate_s"]),
        ("policy/kl", ["policy/kl"]), ("faults", ["faults/worker_replaced"])]  # clip_frac, staleness: flat
    no_accuracy = [{"step": 1, "reward/mean": 1.0, "reward/format": 0.5, "time/step_s": 2.0}]
    assert panels(no_accuracy) == [("reward by function", ["reward/mean", "reward/format"]),
                                   ("seconds per step, by phase", ["time/step_s"])]
    assert panels([]) == []


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
    assert titles == [["accuracy", "reward by function", "seconds per step, by phase", "policy/kl"]]
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
            log.log(step, {"reward/accuracy": 0.75, "reward/mean": 0.8125, "loss/total": 0.0123, "time/step_s": 1.234,
                           "policy/kl": 0.5, "policy/entropy": 0.4567, "reward/zero_std_groups": 0.25})
        log.write("a message")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "step 2/20 | acc 0.750 | entropy 0.457 | flat groups 25% | 1.23 s/step | eta 0:00:18"
    assert [line.split(" | ")[0] for line in lines[:-1]] == [f"step {s}/20" for s in range(2, 21, 2)]
    assert lines[-2].endswith("eta 0:00:00") and lines[-1] == "a message"


def test_progress_every_resume_and_missing_keys(tmp_path, capsys):
    cfg = MetricsConfig(tensorboard=False, progress_every=7)
    with MetricsLogger(tmp_path, cfg, total_steps=20, resume_from_step=5) as log:
        for step in range(6, 21):
            log.log(step, {"policy/entropy": 0.5} if step < 20 else {"val/accuracy": 0.25, "loss/total": 2.0})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and not any("\r" in line for line in lines)
    assert re.fullmatch(r"step 7/20 \| entropy 0\.500 \| eta \d+:\d\d:\d\d", lines[0])
    assert lines[1].startswith("step 14/20 | entropy 0.500 | eta ")
    assert lines[2] == "step 20/20 | val acc 0.250 | eta 0:00:00"


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
    assert "acc 0.200, 1.50 s/step" in text and "loss" not in text


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
    ({"samples_every": -1}, r"metrics\.samples_every=-1"),
    ({"samples_per_step": 0}, r"samples_per_step=0"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricsConfig(**kwargs)


def test_config_wandb_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"pip install wandb or set metrics\.wandb=false"):
        MetricsConfig(wandb=True)
    assert MetricsConfig().wandb is False and MetricsConfig(wandb_mode="online").tensorboard == "auto"


def _rollout(texts, ids, rewards, group_size):
    import torch

    return types.SimpleNamespace(completions_text=texts, sample_ids=ids, group_size=group_size,
                                 prompts_text=[f"<|im_start|>user {i}?" for i in ids], reward_names=["accuracy", "format"],
                                 rewards=torch.tensor(rewards, dtype=torch.float32))


def test_samples_every_n_steps_to_jsonl_and_tensorboard(tmp_path):
    """``samples_per_step`` completions spread over the batch's prompts, every ``samples_every`` steps, with the
    prompt, image paths, answer and rewards per function; a markdown table in TensorBoard; resume drops later rows."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [types.SimpleNamespace(sample_id=f"p{i}", solution=f"ans{i}",
                                     meta={"image_paths": [str(tmp_path / f"{i}.png")]}) for i in range(4)]
    data = types.SimpleNamespace(records=records)
    batch = _rollout([f"say {i}" for i in range(8)], ["p0", "p1", "p2", "p3"],
                     [[i % 2, 1.0] for i in range(8)], group_size=2)
    cfg = MetricsConfig(tensorboard=True, plot_keys=["reward/mean"], samples_every=2, samples_per_step=2)
    with MetricsLogger(tmp_path, cfg, total_steps=4) as log:
        for step in range(1, 5):
            log.log_samples(step, batch, data)
            log.log(step, {"reward/mean": 0.5})
        log.log_samples(4, _rollout(["a|b\nc"], ["p3"], [[1.0, 0.0]], group_size=1), data, split="val")
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["completion"]) for r in rows] == [
        (2, "train", "say 0"), (2, "train", "say 4"), (4, "train", "say 0"), (4, "train", "say 4"), (4, "val", "a|b\nc")]
    assert rows[1] == {"step": 2, "split": "train", "prompt": "<|im_start|>user p2?", "completion": "say 4",
                       "answer": "ans2", "images": [str(tmp_path / "2.png")], "video": None,
                       "rewards": {"accuracy": 0.0, "format": 1.0}}
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    text = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
            for t in acc.Tags()["tensors"] if t.startswith("samples/")}
    assert [s for s, _ in text["samples/train/text_summary"]] == [2, 4]
    table = text["samples/val/text_summary"][0][1].splitlines()
    assert table[:2] == ["| prompt | completion | answer | rewards |", "| --- | --- | --- | --- |"]
    assert table[2] == "| <|im_start|>user p3? | a\\|b c | ans3 | {'accuracy': 1.0, 'format': 0.0} |".replace(
        "<|im_start|>user p3?", "<\\|im_start\\|>user p3?")

    MetricsLogger(tmp_path, MetricsConfig(tensorboard=False), total_steps=4, resume_from_step=3).close()
    assert [r["step"] for r in read_metrics(tmp_path / "samples.jsonl")] == [2, 2]
    MetricsLogger(tmp_path, MetricsConfig(tensorboard=False), total_steps=4).close()  # a fresh run: moved aside
    assert not (tmp_path / "samples.jsonl").exists() and (tmp_path / "samples.jsonl.prev-1").exists()
    with MetricsLogger(tmp_path, MetricsConfig(tensorboard=False, samples_every=0), total_steps=4) as log:
        log.log_samples(10, batch, data)
    assert not (tmp_path / "samples.jsonl").exists()
