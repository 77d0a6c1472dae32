"""Atomic file writes and numbered, atomically committed checkpoint directories; nothing committed is deleted
except by ``keep_last`` rotation. Layout and crash rules: docs/design.md#checkpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from itertools import count
from pathlib import Path
from typing import Any, Optional

CHECKPOINTS_DIRNAME = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.json"

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.tmp$")


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file, or a directory (making renames inside it durable); errors are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old content or the new one, never a
    mix, and a crash (or an exception) midway leaves the old file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)  # mkstemp creates 0600; use the usual mode for new files
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Atomic JSON write (keys sorted; dataclasses, paths, numpy / torch scalars and arrays are
    converted; fails before touching the file when ``obj`` is not JSON-serialisable)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if callable(getattr(x, "tolist", None)):  # numpy / torch: 0-d gives a number
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A committed checkpoint directory: named ``step_N`` (not ``.tmp`` / ``.prev-K``) with a
    readable ``trainer_state.json`` holding a JSON object."""
    try:
        return bool(_STEP_RE.match(Path(path).name)) and load_trainer_state(path) is not None
    except (OSError, ValueError):
        return False


def load_trainer_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint directory (JSON only)."""
    path = Path(ckpt_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {ckpt_dir} is not a complete vlgrpo checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or was not written by vlgrpo") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, expected a JSON object")
    return state


def move_aside(path: Path) -> Path:
    """Rename ``path`` (file or folder) to the first free ``path.prev-K`` (K >= 1) and return it: nothing is deleted."""
    dest = next(d for k in count(1) if not os.path.lexists(d := path.with_name(f"{path.name}.prev-{k}")))
    os.rename(path, dest)
    return dest


class CheckpointManager:
    """Numbered, atomically committed checkpoints under ``OUTPUT_DIR/checkpoints``. ``keep_last``: how many of
    this manager's own commits are kept (older ones are deleted at each commit; ``None`` or ``<= 0``: all); those
    it did not commit (earlier runs, the one resumed from, ``.prev-K``) are never deleted. ``fsync``: flush every
    file of a checkpoint to disk before publishing it (durable across power loss; slow for very large ones)."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: Optional[int] = 3, fsync: bool = True):
        self.root = Path(output_dir) / CHECKPOINTS_DIRNAME
        self.keep_last, self.fsync = keep_last, fsync
        self._committed: set[int] = set()  # steps committed by this manager: the only ones rotation deletes

    def _dir(self, step: int, suffix: str = "") -> Path:
        return self.root / f"step_{int(step):06d}{suffix}"

    def begin(self, step: int) -> Path:
        """Create (afresh) and return ``checkpoints/step_N.tmp`` with an empty ``learner/``. A
        committed ``step_N`` is not touched here (:meth:`commit` moves it aside)."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tmp = self._dir(step, ".tmp")
        if tmp.exists():  # left by a crash: never committed
            shutil.rmtree(tmp)
        (tmp / "learner").mkdir(parents=True)
        return tmp

    def commit(self, step: int, tmp_dir: str | os.PathLike) -> Path:
        """Publish ``tmp_dir`` as ``checkpoints/step_N``: fsync, move an existing ``step_N`` aside,
        rename, write the ``latest`` marker, move aside checkpoints of later steps and rotate this
        manager's older commits beyond ``keep_last``. Returns the committed directory."""
        tmp, final = Path(tmp_dir), self._dir(step)
        if tmp.resolve() != self._dir(step, ".tmp").resolve():
            raise ValueError(f"commit({step}) expects {self._dir(step, '.tmp')} (from begin({step})), got {tmp}")
        if not tmp.is_dir():
            raise FileNotFoundError(f"{tmp} does not exist: call begin({step}) first")
        state = load_trainer_state(tmp)  # refuse to publish a checkpoint without its trainer state
        if "step" in state and int(state["step"]) != int(step):
            raise ValueError(f"{tmp / TRAINER_STATE_NAME} says step {state['step']}, commit was asked for {step}")
        if self.fsync:  # every file and directory, before the rename that publishes them
            for dirpath, _dirnames, filenames in os.walk(tmp):
                for p in [os.path.join(dirpath, fn) for fn in filenames] + [dirpath]:
                    if not os.path.islink(p):
                        _fsync(p)
        if os.path.lexists(final):
            moved = move_aside(final)
            warnings.warn(f"{final} already existed (an earlier run in this output directory?): "
                          f"moved to {moved.name}; it is not deleted automatically")
        os.replace(tmp, final)
        _fsync(self.root)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._committed.add(int(step))
        self._cleanup(int(step))
        return final

    def _cleanup(self, committed: int) -> None:
        for step, path in self.list_checkpoints(complete_only=False):
            if step > committed:
                moved = move_aside(path)
                self._committed.discard(step)
                warnings.warn(f"moved {path} to {moved.name}: it is from a later step than the checkpoint just "
                              f"committed (step {committed}), i.e. from a run resumed from an earlier step")
        for p in self.root.iterdir():  # leftovers of crashed writes (never committed)
            if (m := _TMP_RE.match(p.name)) and int(m.group(1)) <= committed and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        if not self.keep_last or self.keep_last <= 0:
            return
        older = sorted(s for s in self._committed if s < committed and self._dir(s).is_dir())
        for step in older[:max(0, len(older) - (self.keep_last - 1))]:
            doomed = self._dir(step, ".tmp")  # renamed first: a crash mid-delete leaves only a .tmp
            try:
                os.replace(self._dir(step), doomed)
            except OSError:
                doomed = self._dir(step)
            shutil.rmtree(doomed, ignore_errors=True)
            self._committed.discard(step)

    def list_checkpoints(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        """``[(step, dir)]`` of the ``step_N`` directories, ascending (``.tmp`` / ``.prev-K`` never included)."""
        entries = self.root.iterdir() if self.root.is_dir() else ()
        return sorted((int(m.group(1)), p) for p in entries if (m := _STEP_RE.match(p.name))
                      and p.is_dir() and (not complete_only or is_complete_checkpoint(p)))

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (highest step with a valid ``trainer_state.json``), or None."""
        ckpts = self.list_checkpoints()
        return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a ``--resume DIR`` argument: a checkpoint directory itself, or a run's output
    directory / its ``checkpoints`` directory (then its newest complete checkpoint)."""
    path = Path(path)
    hint = f"pass a run's output directory (with checkpoints/step_N/) or a checkpoint dir (with {TRAINER_STATE_NAME})"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; {hint}")
    if _TMP_RE.match(path.name):
        raise ValueError(f"{path}: this checkpoint is incomplete (its write did not finish); "
                         "pass the output directory to resume from the newest complete one")
    if (path / TRAINER_STATE_NAME).is_file():
        load_trainer_state(path)  # validates
        return path
    for root in (path, path.parent) if path.name == CHECKPOINTS_DIRNAME else (path,):
        if (found := CheckpointManager(root).latest()) is not None:
            return found
    raise FileNotFoundError(f"{path}: no complete checkpoint found (looked for "
                            f"{path / CHECKPOINTS_DIRNAME / 'step_N' / TRAINER_STATE_NAME}); {hint}")
