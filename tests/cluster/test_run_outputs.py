"""What a user reads of a run, made by ``vlgrpo train`` as a user runs it (subprocess, real output
directory): validation on the demo's held-out split (``val/*`` in metrics.jsonl, the progress line and
the plot), sample completions every N steps (``samples.jsonl`` and TensorBoard's text tab) and the plot's
panels and title."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlgrpo.cluster.metrics import panels, read_metrics
from vlgrpo.rollout.synthetic import TASKS

from .test_cli import _env


@pytest.mark.slow
def test_a_short_run_validates_logs_samples_and_plots(tmp_path):
    out = tmp_path / "my-run"
    args = ["train", f"trainer.output_dir={out}", "trainer.total_steps=3", "trainer.checkpoint_every=0",
            "trainer.prompts_per_step=2", "rollout.group_size=2", "rollout.num_workers=1", "learner.zero_stage=0",
            "model.tiny_size=micro", "model.tiny_warmup_steps=0", "data.synthetic_size=16",
            "trainer.val_every=2", "trainer.val_size=6", "metrics.samples_every=2", "metrics.samples_per_step=3"]
    proc = subprocess.run([sys.executable, "-m", "vlgrpo.cluster.cli", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # validation: greedy, on the held-out split the run built (as make-data --split test), at steps 2 and 3 (last)
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]  # one record per step: validation adds no line
    assert [("val/accuracy" in r, "val/reward_mean" in r, "time/validate_s" in r) for r in recs] == \
        [(False,) * 3, (True,) * 3, (True,) * 3]
    assert all(0 <= r["val/accuracy"] <= 1 and r["val/accuracy"] == r["val/reward_mean"] for r in recs[1:])
    assert all(0 <= r["reward/zero_std_groups"] <= 1 for r in recs)  # a fraction of the step's groups
    held_out = [json.loads(line) for line in (out / "data" / "color-test" / "data.jsonl").read_text().splitlines()]
    train_images = {p.read_bytes() for p in (out / "data" / "color" / "images").glob("*.png")}
    assert len(held_out) == 6 and not {p.read_bytes() for p in (out / "data" / "color-test" / "images").glob("*.png")} \
        & train_images
    assert "val acc " in proc.stderr and " loss " not in proc.stderr  # the progress line

    # samples: 3 train completions at step 2 (none at 1 and 3), 3 validation answers at step 2
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["split"]) for r in rows) == [(2, "train")] * 3 + [(2, "val")] * 3
    for r in rows:
        assert set(r) == {"step", "split", "prompt", "completion", "answer", "images", "video", "rewards"}
        assert r["video"] is None  # an image task
        assert "colour" in r["prompt"].lower() or "color" in r["prompt"].lower()
        assert r["answer"] in TASKS["color"].options and list(r["rewards"]) == ["accuracy"]
        assert r["images"] and all(Path(p).is_file() for p in r["images"])
        assert Path(r["images"][0]).parent.parent.name == ("color-test" if r["split"] == "val" else "color")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"samples/train/text_summary", "samples/val/text_summary"} <= set(acc.Tags()["tensors"])

    # the plot: accuracy first with val/accuracy, the run's name and steps in the title, no loss
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    chosen = panels(recs)
    assert chosen[0] == ("accuracy", ["reward/accuracy", "val/accuracy"])
    assert [t for t, _ in chosen[1:6]] == ["groups with no reward spread (fraction)", "policy/entropy",
                                           "optim/grad_norm", "response length (tokens)", "seconds per step, by phase"]
    assert not any(k.startswith("loss/") for _, keys in chosen for k in keys)
