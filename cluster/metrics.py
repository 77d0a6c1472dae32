"""Per-step metrics: ``OUTPUT_DIR/metrics.jsonl`` (always), TensorBoard (when installed), W&B
(optional), a progress bar, and a PNG plot of the curves at the end.

``metrics.jsonl`` holds one JSON object per step, ``step`` first and the other keys sorted, values
ints/floats with NaN/inf written as ``null``; each line is flushed and fsynced, so a crash loses at
most the line being written (:func:`read_metrics` skips a truncated last line).

Metric names use ``group/name`` (``reward/mean``, ``reward/accuracy``, ``time/generate_s``,
``sync/mb_per_s``, ``staleness/mean``); TensorBoard uses them as tags as-is.

    log = MetricsLogger(output_dir)                       # or resume_from_step=k on --resume
    bar = ProgressBar(total_steps, initial=start_step)
    for step in ...:
        log.log(step, metrics); bar.update(step, metrics)
    bar.close(); log.close()                              # writes OUTPUT_DIR/metrics.png
"""
from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, TextIO, Union

from .checkpoint import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
PLOT_FILENAME = "metrics.png"
TENSORBOARD_DIRNAME = "tensorboard"

# Keys every step's record carries (the controller's contract; see the cluster issue).
REQUIRED_KEYS = ("step", "reward/mean", "weights_version", "time/step_s")

# Curves plotted by default, in this order, when present ("reward/*" expands to the per-function
# rewards). Summary statistics of the reward besides the mean are not plotted by default.
DEFAULT_PLOT_KEYS = ("reward/mean", "reward/*", "accuracy", "kl", "loss", "clip_fraction",
                     "response_length/mean", "time/step_s", "sync/mb_per_s", "staleness/mean")
_REWARD_STATS = {"reward/mean", "reward/std", "reward/min", "reward/max", "reward/median"}


# ------------------------------------------------------------------------------------------------
# values and the JSONL file
# ------------------------------------------------------------------------------------------------
def _to_number(value: Any) -> Any:
    """A python int/float (None for NaN/inf/None); NotImplemented when not numeric."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0 \
            and not isinstance(value, numbers.Number):  # torch / numpy 0-d
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            return NotImplemented
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return NotImplemented


def format_record(step: int, metrics: Mapping[str, Any], warn_keys: Optional[set] = None) -> dict[str, Any]:
    """The JSON object written for one step: ``step`` first, then the metrics with sorted keys
    (non-numeric values dropped with a warning, NaN/inf as None)."""
    record: dict[str, Any] = {"step": int(step)}
    for key in sorted(str(k) for k in metrics):
        if key == "step":
            continue
        value = _to_number(metrics[key])
        if value is NotImplemented:
            if warn_keys is None or key not in warn_keys:
                warnings.warn(f"metric {key!r} has a non-numeric value {metrics[key]!r} "
                              f"({type(metrics[key]).__name__}); not logged")
                if warn_keys is not None:
                    warn_keys.add(key)
            continue
        record[key] = value
    return record


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
    lines = text.split("\n")
    complete = text.endswith("\n")  # then lines[-1] == ""
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not complete:
                logger.info("%s: ignoring a truncated last line (the writer stopped mid-line)", path)
            else:
                warnings.warn(f"{path}: line {i + 1} is not valid JSON; skipped")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
            warnings.warn(f"{path}: line {i + 1} is not a metrics record (no integer 'step'); skipped")
            continue
        records.append(obj)
    return records


def read_metrics(jsonl_path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (``null`` read back as NaN). A truncated last line (the
    writer crashed mid-line) is ignored; [] when the file does not exist."""
    path = Path(jsonl_path)
    if not path.exists():
        return []
    records = _parse_lines(path.read_text(encoding="utf-8", errors="replace"), path)
    return [{k: (float("nan") if v is None else v) for k, v in r.items()} for r in records]


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------
def default_plot_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys of :data:`DEFAULT_PLOT_KEYS` present (with a finite value) in ``records``."""
    present = set()
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                present.add(k)
    keys: list[str] = []
    for k in DEFAULT_PLOT_KEYS:
        if k == "reward/*":
            keys += sorted(p for p in present if p.startswith("reward/") and p not in _REWARD_STATS)
        elif k in present and k not in keys:
            keys.append(k)
    return keys


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, n, buf = [], 0.0, 0, []
    for v in values:
        if math.isfinite(v):
            buf.append(v)
            acc += v
            n += 1
        else:
            buf.append(None)
        if len(buf) > window:
            old = buf.pop(0)
            if old is not None:
                acc -= old
                n -= 1
        out.append(acc / n if n else float("nan"))
    return out


def plot_metrics(jsonl_path: Union[str, os.PathLike], png_path: Union[str, os.PathLike],
                 keys: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Path:
    """Plot the curves of ``metrics.jsonl`` into a PNG (matplotlib, Agg; one subplot per key;
    default keys: :func:`default_plot_keys`). Written atomically; returns ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(jsonl_path)
    keys = list(keys) if keys is not None else default_plot_keys(records)
    n = max(1, len(keys))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    if not keys or not records:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no metrics recorded" if not records else "none of the plotted keys were logged",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = [(r["step"], r[key]) for r in records
               if key in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [float(p[1]) for p in pts]
        if xs:
            if len(xs) >= 20:
                ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1)
                ax.plot(xs, _smooth(ys, max(2, len(xs) // 20)), color="tab:blue", linewidth=1.6)
            else:
                ax.plot(xs, ys, color="tab:blue", marker="o" if len(xs) < 50 else None, markersize=3)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(png_path, buf.getvalue())


# ------------------------------------------------------------------------------------------------
# logger
# ------------------------------------------------------------------------------------------------
def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except Exception:
        return False
    return True


class MetricsLogger:
    """Writes each step's metrics to ``OUTPUT_DIR/metrics.jsonl``, TensorBoard and W&B.

    ``use_tensorboard``: ``"auto"`` (when the ``tensorboard`` package is installed), True (required:
    raises when missing) or False. ``wandb_project``: log to W&B when set and ``wandb`` is
    importable (a warning otherwise); the run id is kept in ``OUTPUT_DIR/wandb_run_id`` so that a
    resumed run continues the same W&B run.

    ``resume_from_step``: continue a run from the checkpoint of step ``k``: records with
    ``step > k`` (and corrupt lines) are dropped from the existing file (rewritten atomically)
    and new records are appended; TensorBoard events after ``k`` are purged. Without it an
    existing non-empty ``metrics.jsonl`` is moved aside to ``metrics.jsonl.prev-N`` (nothing is
    deleted) and a fresh file is started.

    ``close()`` closes the writers and plots the curves to ``OUTPUT_DIR/metrics.png``."""

    def __init__(self, output_dir: Union[str, os.PathLike], use_tensorboard: Union[bool, str] = "auto",
                 wandb_project: Optional[str] = None, resume_from_step: Optional[int] = None,
                 run_name: Optional[str] = None, wandb_config: Optional[Mapping[str, Any]] = None,
                 plot_keys: Optional[Sequence[str]] = None, plot: bool = True):
        if use_tensorboard not in (True, False, "auto"):
            raise ValueError(f"use_tensorboard must be True, False or 'auto', got {use_tensorboard!r}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / METRICS_FILENAME
        self.png_path = self.output_dir / PLOT_FILENAME
        self.plot_keys = plot_keys
        self.plot = plot
        self.resume_from_step = resume_from_step
        self.last_step: Optional[int] = None
        self._lock = threading.Lock()
        self._warned: set = set()
        self._closed = False

        self._prepare_file(resume_from_step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")

        self._tb = None
        if use_tensorboard:
            if tensorboard_available():
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_from_step is None else int(resume_from_step) + 1
                self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIRNAME), purge_step=purge)
            elif use_tensorboard is True:
                raise ImportError("use_tensorboard=True but tensorboard is not installed: "
                                  "pip install 'vlgrpo[tensorboard]' (or tensorboard), or set it to 'auto'")
            else:
                logger.info("tensorboard not installed: metrics go to %s only", self.jsonl_path)

        self._wandb = None
        if wandb_project:
            self._wandb = self._init_wandb(wandb_project, run_name, wandb_config, resume_from_step)

    # -- setup ------------------------------------------------------------------------------------
    def _prepare_file(self, resume_from_step: Optional[int]) -> None:
        path = self.jsonl_path
        if not path.exists() or path.stat().st_size == 0:
            return
        if resume_from_step is None:
            n = 1
            while path.with_name(f"{path.name}.prev-{n}").exists():
                n += 1
            backup = path.with_name(f"{path.name}.prev-{n}")
            os.replace(path, backup)
            warnings.warn(f"{path} existed from an earlier run: moved to {backup.name} (pass "
                          "resume_from_step to continue it instead)")
            return
        k = int(resume_from_step)
        records = _parse_lines(path.read_text(encoding="utf-8", errors="replace"), path)
        kept = [r for r in records if int(r["step"]) <= k]
        atomic_write_text(path, "".join(json.dumps(format_record(r["step"], r), allow_nan=False) + "\n"
                                        for r in kept))
        if kept:
            self.last_step = int(kept[-1]["step"])

    def _init_wandb(self, project, run_name, config, resume_from_step):
        try:
            import wandb
        except ImportError:
            warnings.warn(f"wandb_project={project!r} but wandb is not installed (pip install wandb): "
                          "logging to metrics.jsonl/TensorBoard only")
            return None
        id_file = self.output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if (resume_from_step is not None and id_file.exists()) else None
        try:
            run = wandb.init(project=project, name=run_name, id=run_id, resume="allow" if run_id else None,
                             config=dict(config) if config else None, dir=str(self.output_dir))
        except Exception as e:  # network / auth problems must not stop training
            warnings.warn(f"wandb.init failed ({e}); logging to metrics.jsonl/TensorBoard only")
            return None
        try:
            atomic_write_text(id_file, run.id + "\n")
        except Exception:  # pragma: no cover
            pass
        return run

    # -- logging ----------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record for ``step`` (flushed and fsynced) and mirror it to TensorBoard/W&B.
        Returns the record written."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        record = format_record(step, metrics, self._warned)
        line = json.dumps(record, allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            self.last_step = int(step)
            scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, global_step=int(step))
                self._tb.flush()
            if self._wandb is not None:
                try:
                    self._wandb.log(scalars, step=int(step))
                except Exception as e:  # pragma: no cover - network
                    if "wandb.log" not in self._warned:
                        self._warned.add("wandb.log")
                        warnings.warn(f"wandb.log failed ({e}); continuing without it")
        return record

    def close(self) -> Optional[Path]:
        """Close the writers and write ``metrics.png``. Returns the PNG path (None when plotting
        is off or failed; a failure is a warning, never an error). Idempotent."""
        if self._closed:
            return None
        self._closed = True
        with self._lock:
            try:
                self._file.close()
            finally:
                if self._tb is not None:
                    self._tb.close()
                if self._wandb is not None:
                    try:
                        self._wandb.finish()
                    except Exception:  # pragma: no cover
                        pass
        if not self.plot:
            return None
        try:
            return plot_metrics(self.jsonl_path, self.png_path, keys=self.plot_keys)
        except Exception as e:
            warnings.warn(f"could not plot {self.jsonl_path} to {self.png_path}: {e}")
            return None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# progress bar
# ------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A tqdm bar over training steps with the key figures (``keys``) as postfix.

    When ``file`` (default stderr) is not a TTY, e.g. in ``ray job`` logs, no bar is drawn: a plain
    line ``step 10/100 (10%) | reward/mean=0.41 kl=0.0012 time/step_s=3.2 | elapsed 0:32 eta 4:48``
    is written every ``log_every`` steps (default: about 20 lines per run) and at the last step."""

    def __init__(self, total_steps: int, initial: int = 0,
                 keys: Iterable[str] = ("reward/mean", "kl", "time/step_s"),
                 log_every: Optional[int] = None, file: Optional[TextIO] = None,
                 disable: bool = False, desc: str = "train"):
        self.total = int(total_steps)
        self.initial = int(initial)
        self.n = self.initial
        self.keys = tuple(keys)
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self.desc = desc
        self.log_every = log_every if log_every else max(1, (self.total - self.initial) // 20)
        self._start = time.monotonic()
        self._last_logged: Optional[int] = None
        self._bar = None
        try:
            tty = bool(self.file.isatty())
        except Exception:
            tty = False
        self.interactive = tty and not disable
        if self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, file=self.file, desc=desc,
                             unit="step", dynamic_ncols=True)

    def postfix(self, metrics: Mapping[str, Any]) -> dict[str, str]:
        return {k: _fmt(metrics[k]) for k in self.keys if k in metrics}

    def format_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        done = step - self.initial
        elapsed = time.monotonic() - self._start
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"{self.desc} step {step}/{self.total} ({pct:.0f}%)"]
        figures = " ".join(f"{k}={v}" for k, v in self.postfix(metrics).items())
        if figures:
            parts.append(figures)
        timing = f"elapsed {_fmt_time(elapsed)}"
        if done > 0 and self.total > step:
            timing += f" eta {_fmt_time(elapsed / done * (self.total - step))}"
        parts.append(timing)
        return " | ".join(parts)

    def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """Step ``step`` (1-based count of completed steps) finished with ``metrics``."""
        metrics = metrics or {}
        step = int(step)
        if self.disable:
            self.n = step
            return
        if self._bar is not None:
            if step > self.n:
                self._bar.update(step - self.n)
            post = self.postfix(metrics)
            if post:
                self._bar.set_postfix(post, refresh=True)
        else:
            due = (step - self.initial) % self.log_every == 0 or step >= self.total
            if due and step != self._last_logged:
                print(self.format_line(step, metrics), file=self.file, flush=True)
                self._last_logged = step
        self.n = max(self.n, step)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DEFAULT_PLOT_KEYS", "METRICS_FILENAME", "MetricsLogger", "PLOT_FILENAME", "ProgressBar",
           "REQUIRED_KEYS", "default_plot_keys", "format_record", "plot_metrics", "read_metrics",
           "tensorboard_available"]
