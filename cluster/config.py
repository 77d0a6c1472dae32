"""One config tree for a run, each section its component's own dataclass, loaded from YAML with dotted CLI
overrides; unknown keys rejected, derived values resolved once, ``config.yaml`` recording what ran, every error
naming the field and the fix before any actor starts. Design: docs/design.md#the-config-tree."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import json
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..learner.types import LearnerConfig
from ..modules import get_module_class
from ..modules.loading import ModelConfig
from ..modules.tiny import FAMILIES, SIZES
from ..rollout.data import DataConfig
from ..rollout.rewards import RewardSet
from ..rollout.synthetic import TASKS
from ..rollout.worker import RolloutConfig, resolve_engine_name
from .checkpoint import atomic_write_text
from .metrics import MetricsConfig
from .weight_sync import SyncConfig


class ConfigError(ValueError):
    """A bad config value; the message names the field and the fix."""


TEST_SPLIT_SEED = 1_000_003  # a held-out split (make-data --split test, the demo's validation) is seeded seed + this


@dataclass
class TrainerConfig:
    total_steps: int = 150  # GRPO steps (one batch of prompts, one learner update, one weight sync each)
    prompts_per_step: int = 16  # prompts per step; each gets rollout.group_size completions
    mode: str = "sync"  # sync (on-policy) | async (one-step off-policy: generation overlaps the update)
    seed: int = 0  # data order, sampling seeds, the demo's data and model
    output_dir: str = "runs/vlgrpo"  # config.yaml, metrics, samples, checkpoints (absolute under `ray job submit`)
    checkpoint_every: int = 10  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    ray_address: Optional[str] = None  # None: connect to a running cluster if any (ray job), else local
    timeout_s: float = 600.0  # bound on any single Ray call (generation, update, sync)
    max_retries: int = 3  # times one chunk of prompts is retried on a replacement rollout worker
    dynamic_sampling_rounds: int = 0  # DAPO: drop groups of equal rewards, refill with up to N more rounds; 0 = off
    max_restarts: int = 1  # times a dead learner group is restarted from the last checkpoint (0: stop with the error)
    # validation: greedy answers (one per prompt, as verl) to data.val_sources (the demo: a held-out synthetic split)
    val_every: int = 10  # steps (and the last step); 0 = off; val/* metrics
    val_size: int = 64  # validation prompts (the same seeded draw of the validation rows each time)


@dataclass
class Config:
    """The run config: one section per component, each that component's own config class."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain YAML types (tuples as lists)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def derived(cfg: Config) -> dict[str, Any]:
    """Values of one section computed from others, resolved once (``learner.*`` marked derived)."""
    return {"learner.temperature": cfg.rollout.temperature,
            "learner.total_steps": cfg.trainer.total_steps * cfg.learner.num_iterations,
            "learner.max_completion_length": cfg.rollout.max_tokens, "learner.seed": cfg.trainer.seed}


def describe(cfg: Config) -> str:
    """``cfg`` as YAML (``vlgrpo config``), each option with its help: the comments on its dataclass field (the lines
    right above it and its own), read from the source; derived values as comments (not settable)."""
    out, data = ["# every option, its value and help: save, edit, then vlgrpo train --config this.yaml"], cfg.to_dict()
    for sec in dataclasses.fields(cfg):
        src = textwrap.dedent(inspect.getsource(cls := type(getattr(cfg, sec.name))))
        notes = {t.start[0]: t.string[1:].strip() for t in tokenize.generate_tokens(iter(src.splitlines(True)).__next__)
                 if t.type == tokenize.COMMENT}
        lines, fields = src.splitlines(), {f.name: f for f in dataclasses.fields(cls)}
        out.append(f"\n{sec.name}:  # {cls.__module__}.{cls.__qualname__}")
        for node in [n for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)]:
            f, first = fields[node.target.id], node.lineno
            while lines[first - 2].lstrip().startswith("#"):  # comment lines right above the field
                first -= 1
            out += [f"  # {notes[n]}" for n in range(first, node.lineno)]
            value = yaml.safe_dump([data[sec.name][f.name]], default_flow_style=True, width=float("inf"))[1:-2]
            out.append(f"  # {f.name}: {value}  # derived: {f.metadata['derived']}" if "derived" in f.metadata
                       else f"  {f.name}: {value}  # {notes.get(node.end_lineno) or f.type}")
    return "\n".join(out) + "\n"


_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        errors = []
        for a in [a for a in typing.get_args(tp) if a is not type(None)]:
            try:
                return _coerce(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of " + "; ".join(errors))
    if tp in _EXPECTED:
        if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and (tp is float or float(value).is_integer()):
            return tp(value)
        if isinstance(value, tp) and (tp is not int or not isinstance(value, bool)):
            return value
        raise ConfigError(f"{path}: expected {_EXPECTED[tp]}, got {value!r} ({type(value).__name__})"
                          + (f"; fix: write {path}=true or {path}=false" if tp is bool else ""))
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
        kwargs[key] = _build(tp, value, path) if dataclasses.is_dataclass(tp) else _coerce(path, value, tp)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def apply_override(data: dict, expr: str) -> None:
    if "=" not in expr:
        raise ConfigError(f"override {expr!r}: write section.option=value, e.g. rollout.num_workers=4")
    key, raw = expr.split("=", 1)
    value, node, parts = yaml.safe_load(raw) if raw != "" else "", data, key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {expr!r}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                saved: bool = False, here: bool = True) -> Config:
    """Defaults <- YAML file <- dotted overrides, then derived values resolved and everything
    validated. Derived keys (``learner.temperature`` ...) may not be set by hand; in a ``saved``
    config.yaml of a run (``--resume``) they are recomputed from the other sections. ``here=False``
    (a config for another cluster: ``vlgrpo plan``): no checks of files or packages on this machine."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; fix the path or drop --config for the demo")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"the config file must be a mapping of sections, got {type(data).__name__}")
    for expr in overrides or []:
        apply_override(data, expr)
    learner = data.get("learner") if isinstance(data.get("learner"), dict) else {}
    given = {f"learner.{k}": learner.pop(k) for k in list(learner) if k in _DERIVED}
    cfg = _build(Config, _deep_merge(Config().to_dict(), data), "")
    for key, value in derived(cfg).items():
        if key in given and not saved and given[key] != value:
            raise ConfigError(f"{key}={given[key]!r} is derived ({_DERIVED[key.split('.')[1]]} = {value!r}); "
                              f"remove it and set that instead")
        setattr(cfg.learner, key.split(".")[1], value)
    validate(cfg, here)
    return cfg


_DERIVED = {f.name: f.metadata["derived"] for f in dataclasses.fields(LearnerConfig) if "derived" in f.metadata}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(base.get(k), dict) and isinstance(v, dict) and k not in ("processing_kwargs", "init_kwargs")
        out[k] = _deep_merge(base[k], v) if nested else v
    return out


def validate(cfg: Config, here: bool = True) -> None:
    """Cross-field checks that need no actor and no model load (``here``: also files and packages)."""
    r, t, lr = cfg.rollout, cfg.trainer, cfg.learner

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(r.engine in ("auto", "vllm", "transformers"), f"rollout.engine={r.engine!r}: use auto, vllm or transformers")
    try:
        resolve_engine_name(r.engine if here else "auto")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    need(r.num_workers >= 1, f"rollout.num_workers={r.num_workers}: need at least 1 rollout worker")
    need(r.gpus_per_worker == -1 or float(r.gpus_per_worker).is_integer(), f"rollout.gpus_per_worker="
         f"{r.gpus_per_worker}: a rollout worker needs whole GPUs (-1: tensor_parallel_size where there are GPUs)")
    need(r.group_size >= 2, f"rollout.group_size={r.group_size}: GRPO needs >= 2 completions per prompt")
    need(r.max_tokens >= 1, "rollout.max_tokens must be >= 1")
    need(r.temperature > 0, f"rollout.temperature={r.temperature}: must be > 0 for GRPO sampling")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p}: must be in (0, 1]")
    need(lr.num_ranks >= 1, "learner.num_ranks must be >= 1")
    need(t.mode in ("sync", "async"), f"trainer.mode={t.mode!r}: use sync or async")
    need(t.total_steps >= 1, "trainer.total_steps must be >= 1")
    need(t.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1")
    need(t.dynamic_sampling_rounds >= 0, "trainer.dynamic_sampling_rounds must be >= 0 (0 turns it off)")
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
    need(bool(r.rewards), "rollout.rewards is empty: add at least one reward, e.g. [{name: accuracy}]")
    try:
        RewardSet(list(r.rewards))
    except (ValueError, ImportError, AttributeError) as e:
        raise ConfigError(f"rollout.rewards: {e}") from e
    if cfg.model.path and here:
        p = Path(cfg.model.path)
        if (p.exists() or cfg.model.path.startswith((".", "/"))) and not (p / "config.json").exists():
            raise ConfigError(f"model.path={cfg.model.path!r} has no config.json; point it at a Hugging Face "
                              "model directory (or leave it empty for the tiny demo model)")
    elif not cfg.model.path:
        need(cfg.model.tiny_family in FAMILIES, f"model.tiny_family={cfg.model.tiny_family!r}: use one of {FAMILIES}")
        need(cfg.model.tiny_size in SIZES, f"model.tiny_size={cfg.model.tiny_size!r}: use one of {tuple(SIZES)}")
    if cfg.model.module not in ("auto", ""):
        try:
            get_module_class(cfg.model.module)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.module: {e}") from e
    need(t.val_every >= 0 and t.val_size >= 1, f"trainer.val_every={t.val_every}, trainer.val_size={t.val_size}: "
         "val_every is a number of steps (0 = no validation), val_size a number of prompts (>= 1)")
    for i, src in [(f"{k}[{i}]", s) for k in ("sources", "val_sources") for i, s in enumerate(getattr(cfg.data, k))]:
        need(isinstance(src, dict) and "path" in src,
             f"data.{i} must be a mapping with 'path' (and optional image_folder, accu_reward_method)")
        need(not here or Path(src["path"]).exists(), f"data.{i}.path={src['path']!r} does not exist; fix the path")
        need(not here or not src.get("image_folder") or Path(src["image_folder"]).is_dir(),
             f"data.{i}.image_folder={src.get('image_folder')!r} is not a folder; fix it or leave it "
             "out (images are then looked up next to the JSONL file)")
        unknown = set(src) - {"path", "image_folder", "accu_reward_method", "question_template", "video_fps"}
        need(not unknown, f"data.{i} has unknown keys {sorted(unknown)}; allowed: path, image_folder, "
                          "accu_reward_method, question_template, video_fps")
    need(cfg.data.video_fps > 0, f"data.video_fps={cfg.data.video_fps}: frames a second taken from videos, > 0")
    need("{question}" in cfg.data.question_template,
         f"data.question_template={cfg.data.question_template!r} must contain '{{question}}'")
    if not cfg.data.sources:
        need(cfg.data.synthetic_task in TASKS, f"data.synthetic_task={cfg.data.synthetic_task!r}: use one of {sorted(TASKS)}")
