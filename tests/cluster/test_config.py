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
