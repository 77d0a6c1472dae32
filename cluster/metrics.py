"""Per-step ``group/name`` metrics to ``OUTPUT_DIR/metrics.jsonl`` (one JSON object per step, ``step`` first, keys
sorted, NaN/inf as null, fsynced per line), TensorBoard and W&B, a tqdm progress bar (plain lines when stderr is not
a TTY), sample completions (``samples.jsonl``, TensorBoard text) and at the end the run at a glance, ``metrics.png``."""
from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import secrets
import sys
import time
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from importlib.util import find_spec
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from tqdm import tqdm

from .checkpoint import atomic_write_bytes, atomic_write_text, move_aside

logger = logging.getLogger(__name__)

# metrics.png (title, curves; g/*: group g's other keys), most telling first; from _ALWAYS on, only panels that move
_PANELS = (("accuracy", "reward/accuracy val/accuracy"), ("reward by function", "reward/mean val/reward_mean reward/*"),
           ("groups with no reward spread (fraction)", "reward/zero_std_groups"), ("policy/entropy", "policy/entropy"),
           ("optim/grad_norm", "optim/grad_norm"), ("response length (tokens)", "response_length/mean"),
           ("seconds per step, by phase", "time/step_s time/generate_s time/update_s time/sync_s time/validate_s"),
           ("policy/kl", "policy/kl"), ("policy/clip_frac", "policy/clip_frac"), ("staleness/mean", "staleness/mean"),
           ("faults", "faults/* reward/errors data/skipped"))
_ALWAYS = 7  # and no loss panel: GRPO's loss is ~0 by construction
_FRACTIONS = ("accuracy", "groups with no reward spread (fraction)")  # drawn on 0..1
_REWARD_STATS = {f"reward/{s}" for s in "accuracy mean std min max median errors zero_std_groups".split()}
_SUMMARY = (("reward/accuracy", "acc {:.3f}"), ("val/accuracy", "val acc {:.3f}"), ("policy/entropy", "entropy {:.3f}"),
            ("reward/zero_std_groups", "flat groups {:.0%}"), ("sampling/dropped_groups", "{:.0f} flat dropped"),
            ("time/step_s", "{:.2f} s/step"))  # progress, if present


@dataclass
class MetricsConfig:
    tensorboard: Union[bool, str] = "auto"   # auto (when the tensorboard package imports) | true | false
    wandb: bool = False                       # log to Weights & Biases
    wandb_project: str = "vlgrpo"             # W&B project name
    wandb_mode: str = "offline"               # offline works without a network | online
    progress_every: int = 0                   # 0: every step on a TTY, ~10 lines per run otherwise
    plot_keys: list = field(default_factory=list)  # metrics.png: one panel per key; empty: the panels that judge a run
    samples_every: int = 10                   # steps; completions to OUTPUT_DIR/samples.jsonl (+ TensorBoard); 0 = off
    samples_per_step: int = 4                 # completions logged per sampled step (spread over the batch's prompts)

    def __post_init__(self):
        tb, mode, every = self.tensorboard, self.wandb_mode, self.progress_every
        for ok, msg in [
            (tb in ("auto", True, False), f"metrics.tensorboard={tb!r}: use auto, true or false"),
            (tb is not True or find_spec("tensorboard"),
             "metrics.tensorboard=true but tensorboard is not installed: pip install tensorboard or set it to auto"),
            (mode in ("offline", "online"), f"metrics.wandb_mode={mode!r}: use offline or online"),
            (not self.wandb or find_spec("wandb"),
             "metrics.wandb=true but wandb is not installed: pip install wandb or set metrics.wandb=false"),
            (every >= 0, f"metrics.progress_every={every}: use 0 (automatic) or a number of steps"),
            (self.samples_every >= 0 and self.samples_per_step >= 1, f"metrics.samples_every={self.samples_every}, "
             f"samples_per_step={self.samples_per_step}: use 0 (off) or a number of steps, and 1 or more")]:
            if not ok:
                raise ValueError(msg)


def _move_aside(path: Path) -> None:
    logger.warning("%s existed from an earlier run: moved to %s", path, move_aside(path).name)


def _number(v: Any) -> Union[int, float, None]:
    """int/float for JSON (None for NaN/inf/None); TypeError/ValueError when not a numeric scalar."""
    v = v.item() if hasattr(v, "item") else v  # numpy / torch scalars
    if v is None or isinstance(v, int):
        return None if v is None else int(v)  # bool -> 0/1
    return float(v) if math.isfinite(v) else None  # TypeError for str & co


def _records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl as written (null kept); corrupt or truncated lines skipped."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    out, lines = [], [ln for ln in text.splitlines() if ln.strip()]
    for line in lines:
        with suppress(ValueError):
            out.append(json.loads(line))
    out = [r for r in out if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if len(out) < len(lines):
        logger.warning("%s: skipped %d unreadable line(s)", path, len(lines) - len(out))
    return out


def read_metrics(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (``null`` read back as NaN); [] when it does not exist."""
    return [{k: float("nan") if v is None else v for k, v in r.items()} for r in _records(Path(path))]


def panels(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, curves) of the default plot: ``_PANELS`` with data, less repeated curves and flat late panels."""
    series = {k: [(r["step"], r[k]) for r in records if math.isfinite(r.get(k, math.nan))] for k in {*chain(*records)}}
    series, out, drawn = {k: s for k, s in series.items() if s and k != "step"}, [], []
    for i, (title, wanted) in enumerate(_PANELS):
        keys = [k for w in wanted.split() for k in sorted(series)
                if k == w or w[-1] == "*" and k.startswith(w[:-1]) and k not in _REWARD_STATS]
        keys = [k for k in dict.fromkeys(keys) if (k.split("/")[0], series[k]) not in drawn]  # same group, same curve
        if keys and (i < _ALWAYS or any(len({v for _, v in series[k]}) > 1 for k in keys)):
            out.append((title, keys))
            drawn += [(k.split("/")[0], series[k]) for k in keys]
    return out


def plot_metrics(jsonl: Union[str, os.PathLike], png: Union[str, os.PathLike],
                 keys: Optional[Sequence[str]] = None) -> Path:
    """The run at a glance under its name (:func:`panels`, or a panel per key of ``keys``), written atomically."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    records = sorted(read_metrics(jsonl), key=lambda r: r["step"])
    chosen = [(k, [k]) for k in keys] if keys else panels(records)
    ncols, nrows = min(3, len(chosen)) or 1, math.ceil(len(chosen) / 3) or 1
    fig = Figure(figsize=(4.8 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    fig.suptitle(f"{Path(jsonl).resolve().parent.name}: step {records[-1]['step'] if records else 0}")
    for i, (title, curves) in enumerate(chosen):
        ax = fig.add_subplot(nrows, ncols, i + 1, title=title, xlabel="step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        for key in curves:
            xs, ys = np.array([(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))],
                              dtype=float).reshape(-1, 2).T
            few, w = len(ys) < 40, len(ys) // 20
            line, = ax.plot(xs, ys, alpha=1 if few else 0.35, marker="o" if few else None, ms=3, label=key)
            if not few:  # light smoothing: moving average over ~5% of the run
                ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, "valid"), color=line.get_color())
        if len(curves) > 1:
            ax.legend(fontsize="small")
        ax.set_ylim(*(-0.03, 1.03) if title in _FRACTIONS else ax.get_ylim())
        ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(png, buf.getvalue())


class MetricsLogger(AbstractContextManager):
    """Writes each step's metrics to ``metrics.jsonl``, TensorBoard and W&B, and shows progress; a context manager.
    ``resume_from_step=k`` drops later records (and corrupt lines) of ``metrics.jsonl`` and ``samples.jsonl`` and
    TensorBoard events, and continues the W&B run; without it the old files go to ``*.prev-N``."""

    def __init__(self, output_dir: Union[str, os.PathLike], cfg: MetricsConfig, total_steps: int,
                 resume_from_step: Optional[int] = None, run_config: Optional[dict] = None):
        self.out, self.cfg, self.total = Path(output_dir), cfg, int(total_steps)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path, self.png_path = self.out / "metrics.jsonl", self.out / "metrics.png"
        self.samples_path = self.out / "samples.jsonl"
        self._warned, self._tb, self._wandb = set(), None, None
        resume = resume_from_step is not None
        for path in (self.jsonl_path, self.samples_path):
            if resume and path.exists():
                kept = [r for r in _records(path) if r["step"] <= resume_from_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
            elif not resume and path.exists() and path.stat().st_size:
                _move_aside(path)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if cfg.tensorboard is True or (cfg.tensorboard == "auto" and find_spec("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter
            tb_dir = self.out / "tensorboard"
            if not resume and any(tb_dir.rglob("events.out.tfevents.*")):
                _move_aside(tb_dir)
            self._tb = SummaryWriter(str(tb_dir), purge_step=resume_from_step + 1 if resume else None)
        if cfg.wandb:
            import wandb
            id_file = self.out / "wandb_run_id"
            if not resume and id_file.exists():
                _move_aside(id_file)
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            atomic_write_text(id_file, run_id + "\n")
            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(self.out),
                                     config=run_config, id=run_id, resume="allow")
        self.tty = sys.stderr.isatty()
        self.every = cfg.progress_every or (1 if self.tty else max(1, self.total // 10))
        self._start, self._t0 = resume_from_step or 0, time.monotonic()
        self.bar = tqdm(total=self.total, initial=self._start, desc="train", dynamic_ncols=True, file=sys.stderr,
                        disable=not self.tty)

    def _warn_once(self, tag: tuple, msg: str, *args) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning(msg, *args)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``step``'s record, mirror it to TensorBoard/W&B, show progress; returns the record."""
        step, record = int(step), {"step": int(step)}
        for key in sorted(str(k) for k in metrics if k != "step"):
            if "/" not in key:
                self._warn_once(("group", key), "metric %r has no group: use names like 'group/%s'", key, key)
            try:
                record[key] = _number(metrics[key])
            except (TypeError, ValueError, RuntimeError):
                self._warn_once(("value", key), "metric %r = %r is not a number: not logged", key, metrics[key])
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if step % self.every == 0 or step >= self.total:
            parts = [fmt.format(record[k]) for k, fmt in _SUMMARY if record.get(k) is not None]
            if self.tty:
                self.bar.set_postfix_str(", ".join(parts), refresh=False)
                self.bar.update(step - self.bar.n)
            else:
                eta = (time.monotonic() - self._t0) / max(1, step - self._start) * max(0, self.total - step)
                parts += [f"eta {datetime.timedelta(seconds=round(eta))}"]
                self.write(" | ".join([f"step {step}/{self.total}", *parts]))
        return record

    def log_samples(self, step: int, batch: Any, dataset: Any, split: str = "train") -> None:
        """Every ``samples_every`` steps, a few completions of ``batch`` (a RolloutBatch of ``dataset``'s prompts) with
        prompt, images, answer and rewards per function: to ``samples.jsonl`` and TensorBoard's text tab."""
        n, k, g, said = len(batch.completions_text), self.cfg.samples_per_step, batch.group_size, batch.completions_text
        if not self.cfg.samples_every or step % self.cfg.samples_every or not n:
            return
        records = {r.sample_id: r for r in dataset.records}
        rows = [{"step": step, "split": split, "prompt": batch.prompts_text[i // g], "completion": said[i],
                 "answer": r.solution, "images": r.meta["image_paths"], "video": r.meta.get("video"),
                 "rewards": dict(zip(batch.reward_names, batch.rewards[i].tolist()))}
                for i in range(0, n, max(1, n // k))[:k] for r in [records[batch.sample_ids[i // g]]]]
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        if self._tb is not None:
            cols = ("prompt", "completion", "answer", "rewards")
            md = [cols, ["---"] * 4, *([str(r[c]).replace("|", r"\|").replace("\n", " ") for c in cols] for r in rows)]
            self._tb.add_text(f"samples/{split}", "\n".join(f"| {' | '.join(c)} |" for c in md), global_step=step)

    def write(self, msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    def close(self) -> Optional[Path]:
        """Close the writers and the bar; plot to ``metrics.png`` (returned; None if that failed)."""
        if self._file.closed:
            return None
        self.bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        try:
            return plot_metrics(self.jsonl_path, self.png_path, self.cfg.plot_keys)
        except Exception as e:  # a plot must never fail a finished run
            logger.warning("could not plot %s to %s: %s", self.jsonl_path, self.png_path, e)
            return None

    def __exit__(self, *exc) -> None:
        self.close()
