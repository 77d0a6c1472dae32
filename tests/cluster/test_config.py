"""Config loading: YAML + dotted overrides, types, errors naming the field."""
from __future__ import annotations

import pytest

from vlgrpo.cluster.config import ConfigError, load_config


def test_overrides_and_yaml(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("rollout:\n  num_workers: 3\nlearner:\n  lr: 1e-5\n  betas: [0.9, 0.95]\n")
    cfg = load_config(p, ["learner.zero_stage=3", "trainer.total_steps=7", "learner.lr=3e-6"])
    assert cfg.rollout.num_workers == 3 and cfg.learner.zero_stage == 3 and cfg.trainer.total_steps == 7
    assert cfg.learner.lr == 3e-6 and cfg.learner.betas == (0.9, 0.95)
    assert load_config(p).learner.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string: still a number


@pytest.mark.parametrize("override, message", [
    ("learner.lr=fast", "learner.lr: expected a number"),
    ("rollout.num_workers=0", "rollout.num_workers"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("sync.backend=mpi", "sync.backend"),
    ("nosuch.option=1", "nosuch"),
    ("learner.zero_stage=5", "zero_stage"),
    ("data.question_template=plain", "data.question_template"),
])
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_config_is_saved_and_reloads(tmp_path):
    cfg = load_config(None, ["rollout.num_workers=4"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()


def test_derived_values_resolved_once_and_not_settable(tmp_path):
    cfg = load_config(None, ["rollout.temperature=0.7", "rollout.max_tokens=20", "trainer.total_steps=1000",
                             "learner.num_iterations=2", "trainer.seed=5"])
    lc = cfg.learner
    # an explicit 1000 steps is honoured (no sentinel): 2 optimiser steps per batch
    assert (lc.temperature, lc.max_completion_length, lc.total_steps, lc.seed) == (0.7, 20, 2000, 5)
    for override in ("learner.temperature=0.5", "learner.total_steps=10", "learner.seed=1"):
        with pytest.raises(ConfigError, match="derived.*remove it"):
            load_config(None, [override])
    # a saved config.yaml carries the derived values; resuming with new overrides re-derives them
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml", ["trainer.total_steps=50"], saved=True)
    assert again.learner.total_steps == 100 and again.learner.temperature == 0.7


@pytest.mark.parametrize("override", ["learner.model_path=/x", "learner.module=qwen", "trainer.tensorboard=false"])
def test_keys_that_moved_are_rejected(override):
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(None, [override])


def test_sections_are_the_component_configs():
    from vlgrpo.learner.types import LearnerConfig
    from vlgrpo.modules.loading import ModelConfig
    from vlgrpo.rollout.worker import RolloutConfig

    cfg = load_config(None, [])
    assert type(cfg.learner) is LearnerConfig and type(cfg.rollout) is RolloutConfig
    assert type(cfg.model) is ModelConfig


@pytest.mark.parametrize("override, field", [("learner.gpus_per_rank=0.5", "gpus_per_rank"),
                                             ("rollout.gpus_per_worker=0.25", "rollout.gpus_per_worker")])
def test_fractional_gpus_are_rejected_before_actors_start(override, field):
    """A learner rank and a vLLM engine sharing a GPU cannot be in one NCCL sync group."""
    with pytest.raises(ConfigError, match=f"{field}.*whole GPUs"):
        load_config(None, [override])
    assert load_config(None, [override.split("=")[0] + "=1"])  # whole GPUs are fine


@pytest.mark.parametrize("override, message", [
    ("trainer.val_every=-1", "trainer.val_every=-1"),
    ("trainer.val_size=0", "trainer.val_size=0"),
    ("data.val_sources=[{path: /no/such.jsonl}]", "data.val_sources[0].path"),
    ("data.val_sources=[{image_folder: x}]", "data.val_sources[0] must be a mapping with 'path'"),
    ("metrics.samples_every=-2", "metrics.samples_every=-2"),
    ("metrics.samples_per_step=0", "samples_per_step=0"),
])
def test_validation_and_samples_options_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_describe_reads_each_fields_comments_from_the_source():
    from vlgrpo.cluster.config import describe

    lines = describe(load_config(None, ["sync.bucket_mb=8"])).splitlines()
    i = lines.index("  transport: auto  # str")  # no comment of its own: its type; the two lines above are its help
    assert lines[i - 2].startswith("  # auto: workers on the learner's node") and lines[i - 1].startswith("  # others")
    assert "  bucket_mb: 8.0  # benchmarks/weight_sync: 16 MB beat 1, 64 and 256 MB over gloo on CPU" in lines
    assert "  # seed: 0  # derived: trainer.seed" in lines  # learner.seed: shown, not settable
    assert any(line.startswith("  seed: 0  # data order") for line in lines)  # trainer.seed
