"""The ``vlgrpo`` command line, run as users run it: the console script (or ``python -m``) in a
subprocess, outputs checked against independent computations."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "vlgrpo"
MODULE_CMD = [sys.executable, "-m", "vlgrpo.cluster.cli"]
USER_REWARD = '''
def chars(completions, samples, **kwargs):
    """A reward that depends on the text: its length in characters / 10."""
    return [len(c) / 10.0 for c in completions]
'''


def _env(extra_path: Path | None = None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 300, extra_path: Path | None = None,
            use_module: bool = False) -> subprocess.CompletedProcess:
    cmd = MODULE_CMD if use_module or not SCRIPT.exists() else [str(SCRIPT)]
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=_env(extra_path), capture_output=True, text=True,
                          timeout=timeout)


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


# -- help and modules ------------------------------------------------------------------------------
def test_console_script_installed_and_help(tmp_path):
    assert SCRIPT.exists(), "pip install -e . should install the 'vlgrpo' console script"
    for use_module in (False, True):
        out = _ok(run_cli("--help", cwd=tmp_path, use_module=use_module)).stdout
        assert out.startswith("usage: vlgrpo")
        for cmd in ("train", "eval", "make-data", "tiny-model", "modules"):
            assert cmd in out
    out = _ok(run_cli("eval", "--help", cwd=tmp_path)).stdout
    for opt in ("--model", "--data", "--image-folder", "--engine", "--num-generations", "--max-tokens"):
        assert opt in out
    bad = run_cli("no-such-command", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_modules_lists_registered_modules(tmp_path):
    lines = _ok(run_cli("modules", cwd=tmp_path)).stdout.splitlines()
    assert "qwen\tvlgrpo.modules.qwen:QwenModule" in lines
    assert "internvl\tvlgrpo.modules.internvl:InternVLModule" in lines


# -- tiny-model, make-data, eval -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_model")
    out = work / "tiny-qwen2vl"
    info = last_json(_ok(run_cli("tiny-model", "--family", "qwen2-vl", out, cwd=work)).stdout)
    return out, info


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli_data")
    out = work / "color"
    info = last_json(_ok(run_cli("make-data", "--task", "color", "--n", "12", out, cwd=work)).stdout)
    return out, info


def test_tiny_model_is_loadable(cli_model):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from vlgrpo.modules import resolve_module
    from vlgrpo.modules.loading import load_model_and_processor

    out, info = cli_model
    assert Path(info["path"]) == out
    assert info["family"] == "qwen2-vl" and info["size"] == "tiny"
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"
    module = resolve_module(str(out))
    assert module.get_vlm_key() == "qwen"
    model, processor = load_model_and_processor(str(out), module, torch.float32)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    text = module.prepare_prompt(processor, [{"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}])
    assert text[0].endswith("assistant\n")


def test_make_data_writes_jsonl_and_images(cli_data):
    from vlgrpo.rollout.data import DataSource, load_datasets
    from vlgrpo.rollout.synthetic import TASKS

    out, info = cli_data
    assert info == {"data": str(out / "data.jsonl"), "image_folder": str(out), "rows": 12, "task": "color",
                    "split": "train"}
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert not Path(r["image"]).is_absolute() and (out / r["image"]).is_file()
        assert r["conversations"][1]["value"] in TASKS["color"].options
    assert len(list((out / "images").glob("*.png"))) == 12
    ds = load_datasets(DataSource(out / "data.jsonl"))
    assert len(ds) == 12 and ds.num_skipped == 0


@pytest.mark.slow
def test_eval_prints_consistent_summary(cli_model, cli_data, tmp_path):
    """One JSON line whose numbers match an in-process rollout with the same settings."""
    import torch

    from vlgrpo.rollout.data import DataSource, load_datasets
    from vlgrpo.rollout.types import SamplingConfig
    from vlgrpo.modules.loading import ModelConfig
    from vlgrpo.rollout.worker import RolloutConfig, RolloutWorker

    model, _ = cli_model
    data, _ = cli_data
    (tmp_path / "user_rewards_cli.py").write_text(USER_REWARD)
    rewards = "accuracy,format,user_rewards_cli:chars"
    proc = _ok(run_cli("eval", "--model", model, "--data", data / "data.jsonl", "--image-folder", data,
                       "--engine", "transformers", "--num-generations", "2", "--max-tokens", "4",
                       "--rewards", rewards, cwd=tmp_path, extra_path=tmp_path))
    summary = last_json(proc.stdout)
    assert summary["rows"] == 12 and summary["skipped"] == 0
    assert summary["completions"] == 24 and summary["reward_errors"] == 0
    names = ["accuracy", "format", "user_rewards_cli:chars"]
    for n in names:
        assert f"reward/{n}" in summary
    assert 0.0 <= summary["reward/accuracy"] <= 1.0 and 0.0 <= summary["reward/format"] <= 1.0
    assert summary["reward/user_rewards_cli:chars"] > 0  # completions are non-empty text
    # all weights are 1: the mean total is the sum of the per-function means
    assert summary["reward/mean"] == pytest.approx(sum(summary[f"reward/{n}"] for n in names), abs=1e-6)

    # The same rollout in this process (same seed, same model, same data) gives the same numbers.
    sys.path.insert(0, str(tmp_path))
    try:
        ds = load_datasets([DataSource(data / "data.jsonl", data)])
        worker = RolloutWorker(RolloutConfig(engine="transformers", rewards=[{"name": n} for n in names],
                                             num_threads=0), ModelConfig(path=str(model)))
        batch = worker.generate([ds[i] for i in range(len(ds))],
                                SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=0))
    finally:
        sys.path.remove(str(tmp_path))
    assert batch.rewards.shape == (24, 3)
    chars = torch.tensor([len(t) / 10.0 for t in batch.completions_text])
    assert torch.allclose(batch.rewards[:, 2], chars)
    for j, n in enumerate(names):
        assert summary[f"reward/{n}"] == pytest.approx(float(batch.rewards[:, j].mean()), abs=1e-6), n
    assert summary["reward/mean"] == pytest.approx(float(batch.total_rewards().mean()), abs=1e-6)


# -- train: config errors before Ray -----------------------------------------------------------------
CONFIG_ERRORS = {
    "wrong_type_in_yaml": ('rollout:\n  num_workers: "two"\n', [], ["rollout.num_workers", "integer", "'two'"]),
    "unknown_override": (None, ["rollout.num_wokers=2"], ["rollout.num_wokers", "num_workers"]),
    "unknown_key_in_yaml": ("trainer:\n  total_stpes: 5\n", [], ["trainer.total_stpes", "total_steps"]),
    "bad_override_value": (None, ["trainer.total_steps=many"], ["trainer.total_steps", "'many'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_train_config_error_exits_2_before_ray(case, tmp_path):
    yaml_text, overrides, expected = CONFIG_ERRORS[case]
    args = ["train"]
    if yaml_text is not None:
        (tmp_path / "bad.yaml").write_text(yaml_text)
        args += ["--config", "bad.yaml"]
    proc = run_cli(*args, *overrides, cwd=tmp_path, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "config error" in proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in {proc.stderr!r}"
    assert "Traceback" not in output
    assert "Started a local Ray instance" not in output and "ray.init" not in output
    assert not (tmp_path / "runs").exists(), "nothing may be written for a rejected config"


def test_errors_after_config_are_one_line_before_ray(tmp_path, monkeypatch):
    """Errors only found once the run starts (a hub model id without network, a JSONL whose rows are
    all bad) are one line naming the cause and the fix, before Ray or any actor starts."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_image": 1}\n["not a row"]\n')
    cases = {
        "hub_offline": (["model.path=SomeOrg/NoSuchVLM-7B"], ["SomeOrg/NoSuchVLM-7B", "huggingface-cli download",
                                                          "model.path=DIR"]),
        "all_rows_bad": ([f"data.sources=[{{path: {bad}, image_folder: {tmp_path}}}]"], [str(bad)]),
    }
    for name, (overrides, expected) in cases.items():
        out = tmp_path / name
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without network
        proc = run_cli("train", f"trainer.output_dir={out}", *overrides, cwd=tmp_path, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
        errors = [l for l in proc.stderr.splitlines() if l.startswith("vlgrpo: ")]
        assert len(errors) == 1 and all(t in errors[0] for t in expected), (name, errors)
        assert "Started a local Ray instance" not in output


def test_resume_of_a_folder_that_is_no_run_fails_at_once(tmp_path):
    """``--resume DIR`` continues the run in DIR with its own config.yaml; a DIR without one (empty,
    missing, a typo) is one clear line, before Ray starts, and nothing is written anywhere."""
    (tmp_path / "empty").mkdir()
    for target in ("empty", "missing"):
        proc = run_cli("train", "--resume", target, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"--resume {target}: no config.yaml there" in proc.stderr
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_eval_takes_a_run_dir_its_rewards_and_writes_completions(cli_model, cli_data, tmp_path):
    """``eval --model RUN_DIR`` scores the run's newest checkpoint with the run's own rewards and
    writes every completion; a folder that is no model and no run is one line, exit 2."""
    import shutil

    import yaml

    model, _ = cli_model
    data, _ = cli_data
    run = tmp_path / "run"
    for step in (1, 2):  # the newest complete checkpoint must be the one evaluated
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        shutil.copytree(model, ckpt / "policy")
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "weights_version": step}))
    (run / "config.yaml").write_text(yaml.safe_dump({"rollout": {"rewards": [{"name": "vlgrpo.tests.plugins:char_variety", "weight": 0.5, "label": "variety"}]}}))
    out = tmp_path / "completions.jsonl"
    summary = last_json(_ok(run_cli("eval", "--model", run, "--data", data / "data.jsonl", "--engine", "transformers",
                                    "--num-generations", "2", "--max-tokens", "3", "--completions", out,
                                    cwd=tmp_path)).stdout)
    assert summary["model"] == str(run / "checkpoints" / "step_000002" / "policy")
    assert {k for k in summary if k.startswith("reward/")} == {"reward/mean", "reward/variety"}
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == summary["completions"] == 24
    assert summary["reward/variety"] == pytest.approx(sum(l["rewards"]["variety"] for l in lines) / 24)
    assert summary["reward/variety"] > 0
    assert summary["reward/mean"] == pytest.approx(0.5 * summary["reward/variety"])  # the run's weight
    assert all(l["images"] and Path(l["images"][0]).exists() and "<|im_start|>" in l["prompt"] for l in lines)
    bad = run_cli("eval", "--model", tmp_path / "nope", "--data", data / "data.jsonl", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope: no such file" in bad.stderr


def test_make_data_test_split_is_held_out(tmp_path):
    train = last_json(_ok(run_cli("make-data", "--n", "16", tmp_path / "train", cwd=tmp_path)).stdout)
    test = last_json(_ok(run_cli("make-data", "--n", "16", "--split", "test", tmp_path / "test", cwd=tmp_path)).stdout)
    images = {split: [p.read_bytes() for p in sorted((tmp_path / split / "images").glob("*.png"))]
              for split in ("train", "test")}
    assert train["split"] == "train" and test["split"] == "test" and len(images["test"]) == 16
    assert not set(images["train"]) & set(images["test"]), "the held-out split repeats training images"


# -- config and help -------------------------------------------------------------------------------
def test_config_prints_every_option_with_help_and_loads_back(tmp_path):
    """``vlgrpo config`` prints the whole tree as YAML, every option with a comment (its help from the
    dataclass source), derived values commented out; saved to a file it is ``train --config`` input that
    gives the defaults back (with overrides: the resolved config); a bad override is one line, exit 2."""
    import dataclasses
    import re

    from vlgrpo.cluster.config import Config, load_config

    text = _ok(run_cli("config", cwd=tmp_path)).stdout
    lines = text.splitlines()
    for section in dataclasses.fields(Config):
        start = lines.index(next(line for line in lines if line.startswith(f"{section.name}:")))
        rest = lines[start + 1:]
        body = rest[:next((i for i, line in enumerate(rest) if line and not line.startswith("  ")), len(rest))]
        for f in dataclasses.fields(getattr(Config(), section.name)):
            prefix = "# " if "derived" in f.metadata else ""
            hit = [line for line in body if line.startswith(f"  {prefix}{f.name}: ")]
            assert len(hit) == 1, (section.name, f.name)
            value, comment = hit[0].split("  # ", 1) if prefix == "" else hit[0][4:].split("  # ", 1)
            assert comment.strip(), (section.name, f.name)
            if prefix:
                assert comment.startswith("derived: ")
    assert "  lr: 0.0005  # the demo's tiny model; a 3B-7B VLM wants ~1e-6" in lines  # the help of the source
    steps = load_config(None).trainer.total_steps
    assert f"  # total_steps: {steps}  # derived: trainer.total_steps x num_iterations" in lines
    assert re.search(r"^  val_every: 10  # .*steps", text, re.M) and "  # placement (read by the cluster)" in lines
    (tmp_path / "all.yaml").write_text(text)
    assert load_config(tmp_path / "all.yaml").to_dict() == load_config(None).to_dict()

    overrides = ["rollout.num_workers=3", "learner.lr=1e-6", "trainer.total_steps=7", "learner.num_iterations=2"]
    text = _ok(run_cli("config", *overrides, cwd=tmp_path)).stdout
    assert "  num_workers: 3  #" in text and "  # total_steps: 14  # derived" in text
    (tmp_path / "mine.yaml").write_text(text)
    assert load_config(tmp_path / "mine.yaml").to_dict() == load_config(None, overrides).to_dict()
    (tmp_path / "base.yaml").write_text("rollout:\n  group_size: 4\n")
    assert "  group_size: 4  #" in _ok(run_cli("config", "--config", "base.yaml", cwd=tmp_path)).stdout

    bad = run_cli("config", "rollout.num_wokers=2", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "num_workers" in bad.stderr


def test_every_option_of_every_command_has_help_and_choices():
    """Each option of every command says what it does; the ones with a fixed set of values list them."""
    import argparse

    from vlgrpo.cluster.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "config", "eval", "make-data", "tiny-model", "scale", "modules"} <= set(sub.choices)
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    choices = {(name, a.dest): a.choices for name, p in sub.choices.items() for a in p._actions if a.choices}
    assert choices[("eval", "engine")] == ["auto", "transformers", "vllm"]
    assert choices[("make-data", "split")] == ["train", "test"] and "color" in choices[("make-data", "task")]
    assert choices[("tiny-model", "family")] and choices[("tiny-model", "size")] == ["micro", "tiny", "small"]


def test_help_of_each_command_as_a_user_sees_it(tmp_path):
    for cmd, must in {"config": ["--config", "overrides"], "make-data": ["--split {train,test}", "held out"],
                      "scale": ["--rollout-workers", "number of rollout workers"],
                      "tiny-model": ["{micro,tiny,small}"], "eval": ["{auto,transformers,vllm}", "greedy"]}.items():
        out = _ok(run_cli(cmd, "--help", cwd=tmp_path)).stdout
        assert all(m in out for m in must), (cmd, out)
