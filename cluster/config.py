"""One typed config for a run: dataclass sections loaded from YAML, with dotted CLI overrides.

    vlgrpo train --config run.yaml rollout.num_workers=4 learner.zero_stage=3 trainer.total_steps=50

Every error names the field and the fix, and is raised before any actor starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..learner.types import LearnerConfig


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    path: str = ""  # HF checkpoint dir or hub id; empty = build a tiny model from config (demo/tests)
    module: str = "auto"  # VLM module key, 'package.module:Class', or auto (from config.json model_type)
    tiny_family: str = "qwen2-vl"  # used when path is empty
    tiny_size: str = "tiny"
    processing_kwargs: dict = field(default_factory=dict)  # e.g. {max_pixels: 401408}


@dataclass
class DataSection:
    # VLM-R1 JSONL files: [{path, image_folder, accu_reward_method, question_template}]; empty = synthetic task
    sources: list = field(default_factory=list)
    question_template: str = "{question}"  # default for sources without their own, e.g. VLM-R1's think/answer prompt
    synthetic_task: str = "color"
    synthetic_size: int = 512


@dataclass
class RolloutSection:
    engine: str = "auto"  # auto | vllm | transformers
    num_workers: int = 2
    gpus_per_worker: float = -1  # -1: 1 per worker when the cluster has GPUs (x tensor_parallel_size), else 0
    cpus_per_worker: float = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 2048
    enforce_eager: bool = False
    num_threads: int = 1  # torch CPU threads per worker
    dtype: str = "auto"
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 12  # the embedded demo's answers are one word; set it for your task
    rewards: list = field(default_factory=lambda: [{"name": "accuracy", "weight": 1.0},
                                                   {"name": "choice", "weight": 0.5}])


@dataclass
class LearnerSection(LearnerConfig):
    num_ranks: int = 1
    gpus_per_rank: float = -1  # -1: 1 when the cluster has GPUs, else 0
    cpus_per_rank: float = 1


@dataclass
class SyncSection:
    bucket_mb: float = 16.0  # benchmarks/weight_sync: 16 MB beat 1, 64 and 256 MB over gloo on CPU
    verify: bool = True  # compare checksums of every bucket on both sides; fail loudly on mismatch
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    # auto: workers on the learner's node read its weights from shared memory (CPU / gloo), the
    # others get the broadcast | shm: like auto, but fail if a worker cannot | broadcast: never shm
    transport: str = "auto"
    timeout_s: float = 300.0


@dataclass
class TrainerSection:
    total_steps: int = 30
    prompts_per_step: int = 8
    mode: str = "sync"  # sync (on-policy) | async (one-step off-policy: generation overlaps the update)
    seed: int = 0
    output_dir: str = "runs/vlgrpo"
    checkpoint_every: int = 10  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    tensorboard: Union[bool, str] = "auto"  # auto | true | false
    ray_address: Optional[str] = None  # None: connect to a running cluster if any (ray job), else local
    timeout_s: float = 600.0  # bound on any single Ray call (generation, update, sync)
    max_retries: int = 3  # times one chunk of prompts is retried on a replacement rollout worker


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    learner: LearnerSection = field(default_factory=lambda: LearnerSection(lr=5e-3, micro_batch_size=16))
    sync: SyncSection = field(default_factory=SyncSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for a in args:
            try:
                return _coerce(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of " + "; ".join(errors))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}; fix: write {path}=true or {path}=false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r} ({type(value).__name__})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
    if tp in (list, dict) or origin in (list, dict, tuple) or tp is tuple:
        want = origin or tp
        if want is tuple and isinstance(value, list):
            return tuple(value)
        if isinstance(value, want):
            return value
        raise ConfigError(f"{path}: expected a {want.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            raise ConfigError(f"unknown option {path!r}" + (f"; did you mean {close}?" if close else "")
                              + f" (options of {prefix or 'the config'}: {', '.join(sorted(known))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(path, value, tp)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def apply_override(data: dict, expr: str) -> None:
    if "=" not in expr:
        raise ConfigError(f"override {expr!r}: write section.option=value, e.g. rollout.num_workers=4")
    key, raw = expr.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {expr!r}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validated."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    defaults = Config().to_dict()
    merged = _deep_merge(defaults, data)
    for expr in overrides or []:
        apply_override(merged, expr)
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    if not isinstance(over, dict):
        raise ConfigError(f"the config file must be a mapping of sections, got {type(over).__name__}")
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, dict) and k not in (
            "processing_kwargs",) else v
    return out


def validate(cfg: Config) -> None:
    """Cross-field checks that need no actor and no model load."""
    r, t, lr = cfg.rollout, cfg.trainer, cfg.learner

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(r.engine in ("auto", "vllm", "transformers"), f"rollout.engine={r.engine!r}: use auto, vllm or transformers")
    need(r.num_workers >= 1, f"rollout.num_workers={r.num_workers}: need at least 1 rollout worker")
    need(r.group_size >= 2, f"rollout.group_size={r.group_size}: GRPO needs >= 2 completions per prompt")
    need(r.max_tokens >= 1, "rollout.max_tokens must be >= 1")
    need(r.temperature > 0, f"rollout.temperature={r.temperature}: must be > 0 for GRPO sampling")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p}: must be in (0, 1]")
    need(lr.num_ranks >= 1, "learner.num_ranks must be >= 1")
    need(t.mode in ("sync", "async"), f"trainer.mode={t.mode!r}: use sync or async")
    need(t.total_steps >= 1, "trainer.total_steps must be >= 1")
    need(t.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1")
    need(t.prompts_per_step * r.group_size >= lr.num_ranks,
         f"trainer.prompts_per_step x rollout.group_size = {t.prompts_per_step * r.group_size} rows cannot be "
         f"split over learner.num_ranks={lr.num_ranks}; raise prompts_per_step or lower num_ranks")
    need(cfg.sync.backend in ("auto", "gloo", "nccl"), f"sync.backend={cfg.sync.backend!r}: use auto, gloo or nccl")
    need(cfg.sync.bucket_mb > 0, "sync.bucket_mb must be > 0")
    need(cfg.sync.transport in ("auto", "shm", "broadcast"),
         f"sync.transport={cfg.sync.transport!r}: use auto, shm or broadcast")
    need(not (cfg.sync.transport == "shm" and cfg.sync.backend == "nccl"),
         "sync.transport=shm reads CPU weights from shared memory and cannot go with sync.backend=nccl; "
         "use sync.transport=auto (or broadcast)")
    need(t.tensorboard in ("auto", True, False), f"trainer.tensorboard={t.tensorboard!r}: use auto, true or false")
    need(bool(r.rewards), "rollout.rewards is empty: add at least one reward, e.g. [{name: accuracy}]")
    from ..rollout.rewards import RewardSet

    try:
        RewardSet(list(r.rewards))
    except (ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"rollout.rewards: {e}") from e
    if cfg.model.path:
        p = Path(cfg.model.path)
        if (p.exists() or cfg.model.path.startswith((".", "/"))) and not (p / "config.json").exists():
            raise ConfigError(f"model.path={cfg.model.path!r} has no config.json; point it at a Hugging Face "
                              "model directory (or leave it empty for the tiny demo model)")
    else:
        from ..modules.tiny import FAMILIES, SIZES

        need(cfg.model.tiny_family in FAMILIES, f"model.tiny_family={cfg.model.tiny_family!r}: use one of {FAMILIES}")
        need(cfg.model.tiny_size in SIZES, f"model.tiny_size={cfg.model.tiny_size!r}: use one of {tuple(SIZES)}")
    if cfg.model.module not in ("auto", ""):
        from ..modules import get_module_class

        try:
            get_module_class(cfg.model.module)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.module: {e}") from e
    for i, src in enumerate(cfg.data.sources):
        need(isinstance(src, dict) and "path" in src,
             f"data.sources[{i}] must be a mapping with 'path' (and optional image_folder, accu_reward_method)")
        need(Path(src["path"]).exists(), f"data.sources[{i}].path={src['path']!r} does not exist")
        unknown = set(src) - {"path", "image_folder", "accu_reward_method", "question_template"}
        need(not unknown, f"data.sources[{i}] has unknown keys {sorted(unknown)}; allowed: path, image_folder, "
                          "accu_reward_method, question_template")
    need("{question}" in cfg.data.question_template,
         f"data.question_template={cfg.data.question_template!r} must contain '{{question}}'")
    if not cfg.data.sources:
        from ..rollout.synthetic import TASKS

        need(cfg.data.synthetic_task in TASKS, f"data.synthetic_task={cfg.data.synthetic_task!r}: use one of {sorted(TASKS)}")
