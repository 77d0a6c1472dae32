"""metrics.jsonl, TensorBoard mirror, PNG plot, resume truncation and the progress bar."""
from __future__ import annotations

import io
import json
import math
import sys
import warnings

import pytest

from vlgrpo.cluster.metrics import (REQUIRED_KEYS, MetricsLogger, ProgressBar, default_plot_keys, plot_metrics,
                                    read_metrics, tensorboard_available)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(step: int) -> dict:
    return {"reward/mean": 0.1 * step, "reward/accuracy": 0.05 * step, "reward/format": 1.0,
            "weights_version": step, "time/step_s": 1.5, "kl": 0.001 * step, "loss": -0.01 * step,
            "time/generate_s": 0.75}


def _lines(path):
    return path.read_text().splitlines()


def test_jsonl_one_object_per_step(tmp_path):
    np = pytest.importorskip("numpy")
    import torch

    log = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(1, 4):
        extra = {"clip_fraction": np.float32(0.25), "response_length/mean": torch.tensor(12.0),
                 "nan_metric": float("nan"), "inf_metric": float("inf"), "flag": True}
        log.log(step, {**_metrics(step), **extra})
        # flushed and fsynced per line: readable before close
        assert len(_lines(tmp_path / "metrics.jsonl")) == step
    log.close()

    lines = _lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 3
    for step, line in enumerate(lines, start=1):
        assert "NaN" not in line and "Infinity" not in line  # strict JSON
        obj = json.loads(line)
        keys = list(obj)
        assert keys[0] == "step" and obj["step"] == step
        assert keys[1:] == sorted(keys[1:])
        assert set(REQUIRED_KEYS) <= set(obj)
        assert obj["nan_metric"] is None and obj["inf_metric"] is None
        assert obj["weights_version"] == step and isinstance(obj["weights_version"], int)
        assert obj["clip_fraction"] == 0.25 and obj["response_length/mean"] == 12.0 and obj["flag"] == 1
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert math.isnan(recs[0]["nan_metric"])
    assert recs[2]["reward/mean"] == pytest.approx(0.3)


def test_non_numeric_values_are_dropped_with_a_warning(tmp_path):
    with MetricsLogger(tmp_path, use_tensorboard=False, plot=False) as log:
        with pytest.warns(UserWarning, match="non-numeric"):
            rec = log.log(1, {"reward/mean": 1.0, "mode": "async"})
        assert rec == {"step": 1, "reward/mean": 1.0}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per key
            log.log(2, {"reward/mean": 1.0, "mode": "async"})


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.6}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_resume_drops_later_steps_and_appends(tmp_path):
    log = MetricsLogger(tmp_path, use_tensorboard=False, plot=False)
    for step in range(1, 6):
        log.log(step, _metrics(step))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward')  # crashed mid-line

    log = MetricsLogger(tmp_path, use_tensorboard=False, plot=False, resume_from_step=3)
    assert log.last_step == 3
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    log.log(4, _metrics(4))
    log.close()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(json.loads(line) for line in _lines(tmp_path / "metrics.jsonl"))
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # atomic rewrite left no temp file


def test_fresh_run_moves_old_file_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "reward/mean": 1.0}\n')
    with pytest.warns(UserWarning, match="moved to"):
        log = MetricsLogger(tmp_path, use_tensorboard=False, plot=False)
    log.log(1, _metrics(1))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl.prev-1")] == [7]


def test_close_writes_png_plot(tmp_path):
    log = MetricsLogger(tmp_path, use_tensorboard=False)
    for step in range(1, 26):
        log.log(step, {**_metrics(step), "reward/std": 0.1, "sync/mb_per_s": 100.0})
    png = log.close()
    assert png == tmp_path / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert log.close() is None  # idempotent

    recs = read_metrics(tmp_path / "metrics.jsonl")
    keys = default_plot_keys(recs)
    assert keys == ["reward/mean", "reward/accuracy", "reward/format", "kl", "loss", "time/step_s",
                    "sync/mb_per_s"]
    # explicit keys (one missing) and an empty file still give a valid PNG
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "sub.png", keys=["kl", "not_logged"])
    assert out.read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_metrics(tmp_path / "empty.jsonl", tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard not installed")
def test_tensorboard_events(tmp_path):
    log = MetricsLogger(tmp_path)  # "auto": on, since tensorboard is installed
    for step in range(1, 4):
        log.log(step, _metrics(step))
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"reward/mean", "reward/accuracy", "time/generate_s", "weights_version"} <= set(tags)
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]
    assert acc.Scalars("reward/mean")[-1].value == pytest.approx(0.3)

    # resume from step 2: TensorBoard drops the old step 3 (purge_step) and takes the new one
    log = MetricsLogger(tmp_path, resume_from_step=2, plot=False)
    log.log(3, {**_metrics(3), "reward/mean": 9.0})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [
        (1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, 9.0)]


def test_tensorboard_required_but_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("vlgrpo.cluster.metrics.tensorboard_available", lambda: False)
    with pytest.raises(ImportError, match="tensorboard"):
        MetricsLogger(tmp_path, use_tensorboard=True)
    log = MetricsLogger(tmp_path / "auto", use_tensorboard="auto", plot=False)
    log.log(1, _metrics(1))
    log.close()
    assert not (tmp_path / "auto" / "tensorboard").exists()


def test_wandb_missing_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        log = MetricsLogger(tmp_path, use_tensorboard=False, wandb_project="demo", plot=False)
    log.log(1, _metrics(1))
    log.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_progress_bar_plain_lines_without_tty():
    out = io.StringIO()  # not a TTY, like ray job logs
    bar = ProgressBar(10, initial=0, log_every=5, file=out)
    assert not bar.interactive
    for step in range(1, 11):
        bar.update(step, _metrics(step))
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train step 5/10 (50%)") and "reward/mean=0.5" in lines[0]
    assert "kl=0.005" in lines[0] and "time/step_s=1.5" in lines[0] and "eta" in lines[0]
    assert lines[1].startswith("train step 10/10 (100%)")


def test_progress_bar_resumed_logs_last_step():
    out = io.StringIO()
    bar = ProgressBar(7, initial=3, file=out)  # default log_every: 1 for 4 steps
    for step in range(4, 8):
        bar.update(step, {"reward/mean": 1.0})
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == [
        "train step 4/7 (57%)", "train step 5/7 (71%)", "train step 6/7 (86%)", "train step 7/7 (100%)"]


def test_progress_bar_tqdm_on_tty():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    out = TTY()
    bar = ProgressBar(4, file=out)
    assert bar.interactive
    for step in range(1, 5):
        bar.update(step, _metrics(step))
    bar.close()
    text = out.getvalue()
    assert "4/4" in text and "reward/mean=0.4" in text and "kl=0.004" in text
