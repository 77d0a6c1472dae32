"""Atomic, safetensors-only checkpoints.

Layout under ``OUTPUT_DIR/checkpoints``::

    step_000010/
        policy/              Hugging Face format (safetensors + config + processor files):
                             loads with ``from_pretrained`` and vLLM as-is
        learner/             filled by the learner (DeepSpeed / optimizer state)
        trainer_state.json   step, weights_version, sampler state, RNG, config hash, ...
    step_000020.tmp/         a checkpoint being written (or left by a crash): always ignored
    latest                   text marker naming the newest committed checkpoint

Every checkpoint is written into ``step_N.tmp`` and renamed to ``step_N`` only when complete
(after fsync), so a crash at any point leaves the previous checkpoint usable. Single files are
written with :func:`atomic_write_bytes` (temp file in the same directory, fsync, ``os.replace``,
fsync of the directory).

Loading uses JSON and safetensors only: nothing here unpickles files.

    mgr = CheckpointManager(output_dir, keep_last=3)
    tmp = mgr.begin(step)
    mgr.save_policy(tmp, model=model, processor=processor)   # or save_hf_policy(items, src, tmp / "policy")
    learner.save_checkpoint(str(tmp / "learner"))
    mgr.write_trainer_state(tmp, {"step": step, "weights_version": v, ...})
    mgr.commit(step, tmp)
    ...
    ckpt = mgr.latest()              # or resolve_checkpoint(user_path) for ``--resume DIR``
    state = load_trainer_state(ckpt)
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
POLICY_DIRNAME = "policy"
LEARNER_DIRNAME = "learner"
TRAINER_STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
WEIGHTS_NAME = "model.safetensors"

_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_RE = re.compile(r"^step_(\d+)\.(tmp|old.*)$")

# Files of a model directory that are weights (never copied from the source by save_hf_policy).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames/creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual mode for new files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Atomic JSON write (keys sorted; dataclasses and paths are converted; fails before touching
    the file when ``obj`` is not JSON-serialisable)."""
    text = json.dumps(_jsonable(obj), indent=indent, sort_keys=True)
    return atomic_write_text(path, text + "\n")


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        return x.item()
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays, small tensors
        return x.tolist()
    return x


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt or was not written "
                         "by vlgrpo") from None


def config_hash(config: Any) -> str:
    """Stable short hash of a config (dataclass / dict) for ``trainer_state.json``: resuming with a
    different config can then be detected."""
    blob = json.dumps(_jsonable(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# RNG state as JSON (for trainer_state.json; no pickles)
# ------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states as a JSON-serialisable dict."""
    import random

    import torch

    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(internal), gauss],
                           "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing entries are left alone)."""
    import random

    import torch

    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(states)} devices, this process sees "
                          f"{torch.cuda.device_count()}; CUDA RNG not restored")


# ------------------------------------------------------------------------------------------------
# safetensors helpers
# ------------------------------------------------------------------------------------------------
def _untie(tensors: dict[str, Any]) -> dict[str, Any]:
    """CPU, contiguous, detached tensors; tensors that share storage with an earlier one (tied
    embeddings, views) are cloned, since safetensors refuses shared storage."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no data): gather the full weights first "
                             "(ZeRO-3: use the learner's gathered named_weights)")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        key = (t.device.type, t.untyped_storage().data_ptr())
        if key in seen and t.numel() > 0:
            t = t.clone()
        elif not t.is_contiguous():
            t = t.contiguous()
        else:
            seen.add(key)
        out[name] = t
    # A tensor that is a view of a larger storage is fine alone, but safetensors also rejects two
    # distinct views of one storage; the ``seen`` check above clones the second one.
    return out


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any],
                     metadata: Optional[dict[str, str]] = None) -> Path:
    """Atomically write ``tensors`` to a safetensors file (shared tensors are cloned)."""
    from safetensors.torch import save

    meta = {"format": "pt", **(metadata or {})}
    return atomic_write_bytes(path, save(_untie(tensors), metadata=meta))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file (no pickle involved)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def _source_weight_names(model_dir: Path) -> Optional[set[str]]:
    """Tensor names stored in a HF model directory's safetensors (headers only), or None."""
    index = model_dir / (WEIGHTS_NAME + ".index.json")
    if index.exists():
        try:
            return set(read_json(index)["weight_map"])
        except (ValueError, KeyError):
            return None
    single = model_dir / WEIGHTS_NAME
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    return None


def _reverted_names(tensors: dict[str, Any], config_source_dir: Path) -> Optional[dict[str, Any]]:
    """``tensors`` renamed to the checkpoint format transformers' ``save_pretrained`` writes
    (e.g. Qwen2-VL's in-memory ``model.language_model.layers.0...`` -> ``model.layers.0...``), via a
    meta-device skeleton of the model; None when that is not possible."""
    try:
        import torch
        import transformers
        from transformers import AutoConfig
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 keeps in-memory names in checkpoints
        return None
    try:
        config = AutoConfig.from_pretrained(str(config_source_dir))
        archs = getattr(config, "architectures", None) or []
        cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
        if cls is None:
            return None
        with torch.device("meta"):
            skeleton = cls(config)
        return revert_weight_conversion(skeleton, dict(tensors))
    except Exception as e:  # pragma: no cover - unusual architectures
        logger.debug("could not revert weight names with transformers: %s", e)
        return None


def _drop_tied_extras(tensors: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    """Drop names the source checkpoint does not have when they are tied to (share storage with)
    a name it has, e.g. ``lm_head.weight`` of a model with ``tie_word_embeddings``."""
    kept_ptrs = {t.untyped_storage().data_ptr() for k, t in tensors.items() if k in wanted and t.numel()}
    return {k: t for k, t in tensors.items()
            if k in wanted or not t.numel() or t.untyped_storage().data_ptr() not in kept_ptrs}


def _copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer, processor and chat template files (every regular
    non-weight file at the top level of ``src``)."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``, replacing an existing ``final``."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before the rename that publishes it)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if os.path.islink(p):
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:  # pragma: no cover
                continue
            try:
                os.fsync(fd)
            except OSError:  # pragma: no cover
                pass
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _staging_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=str(out_dir.parent)))


@contextlib.contextmanager
def _staged(out_dir: Path):
    """Yield a staging directory next to ``out_dir``; when the block succeeds it is fsynced and
    renamed onto ``out_dir``, when it raises it is removed (``out_dir`` is untouched either way
    until the rename)."""
    stage = _staging_dir(out_dir)
    try:
        yield stage
        _fsync_tree(stage)
        _replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------
# policy in Hugging Face format
# ------------------------------------------------------------------------------------------------
def save_hf_policy(state_dict_items: Iterable[tuple[str, Any]], config_source_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, dtype: Any = None,
                   metadata: Optional[dict[str, str]] = None) -> Path:
    """Write a policy from a plain state dict as a Hugging Face model directory that loads with
    ``from_pretrained`` (and vLLM) as-is.

    ``state_dict_items``: ``(name, tensor)`` pairs, in-memory names (``model.state_dict()``) or
    checkpoint names (the learner's ``named_weights``). Names are written in the format of the
    source checkpoint (transformers' renamings reverted when needed). Tensors sharing storage are
    cloned. ``dtype`` optionally casts floating-point tensors (e.g. ``torch.bfloat16``).

    ``config_source_dir``: the model directory the policy was loaded from; its config.json,
    generation_config.json, tokenizer/processor files and chat template are copied.

    The directory is staged next to ``out_dir`` and renamed into place at the end, so ``out_dir``
    holds either its previous content or the complete new policy."""
    src = Path(config_source_dir)
    out = Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: config_source_dir must be the Hugging Face "
                                "model directory the policy was loaded from")
    tensors: dict[str, Any] = {}
    for name, t in state_dict_items:
        if name in tensors:
            raise ValueError(f"tensor name {name!r} appears twice in state_dict_items")
        tensors[name] = t
    if not tensors:
        raise ValueError("state_dict_items is empty: nothing to save")
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}

    wanted = _source_weight_names(src)
    if wanted is None or set(tensors) != wanted:
        reverted = _reverted_names(tensors, src)
        if reverted is not None:
            if wanted is None or set(reverted) == wanted:
                tensors = reverted
            elif len(set(reverted) & wanted) > len(set(tensors) & wanted):
                tensors = reverted
        if wanted is not None:
            tensors = _drop_tied_extras(tensors, wanted)
        if wanted is not None and set(tensors) != wanted:
            missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
            warnings.warn(f"save_hf_policy: tensor names differ from {src}'s checkpoint "
                          f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, extra "
                          f"{extra[:5]}{'...' if len(extra) > 5 else ''}); writing them as given")

    from safetensors.torch import save_file

    with _staged(out) as stage:
        save_file(_untie(tensors), str(stage / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        _copy_model_files(src, stage)
    return out


def save_policy(out_dir: str | os.PathLike, model: Any = None, processor: Any = None,
                writer: Optional[Callable[[Path], Any]] = None) -> Path:
    """Write a policy directory atomically: ``model.save_pretrained(tmp, safe_serialization=True)``
    and ``processor.save_pretrained(tmp)`` (or ``writer(tmp)``) into a staging directory renamed to
    ``out_dir`` at the end."""
    out = Path(out_dir)
    if writer is None and model is None:
        raise ValueError("save_policy needs a model (and processor) or a writer callable")
    with _staged(out) as stage:
        if writer is not None:
            writer(stage)
        else:
            model.save_pretrained(str(stage), safe_serialization=True)
            if processor is not None:
                processor.save_pretrained(str(stage))
        pickles = [p.name for p in stage.rglob("*") if p.suffix in (".bin", ".pt", ".pth")]
        if pickles:
            raise ValueError(f"policy writer produced pickle files {pickles}; checkpoints are safetensors only")
        if not any(stage.glob("*.safetensors")):
            raise ValueError(f"policy writer wrote no .safetensors file into {stage}")
    return out


# ------------------------------------------------------------------------------------------------
# checkpoint manager
# ------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def _parse_step(name: str) -> Optional[int]:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A committed checkpoint directory: named ``step_N`` (not ``.tmp``) with a readable
    ``trainer_state.json`` holding a JSON object."""
    path = Path(path)
    if not path.is_dir() or _parse_step(path.name) is None:
        return False
    try:
        return isinstance(read_json(path / TRAINER_STATE_NAME), dict)
    except (OSError, ValueError):
        return False


def load_trainer_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint directory (JSON only)."""
    path = Path(ckpt_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {ckpt_dir} is not a complete vlgrpo checkpoint")
    state = read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds {type(state).__name__}, expected a JSON object")
    return state


class CheckpointManager:
    """Numbered, atomically committed checkpoints under ``OUTPUT_DIR/checkpoints``.

    ``keep_last``: number of committed checkpoints kept (older ones are pruned at each commit;
    the one just committed is never deleted); ``None`` or ``<= 0`` keeps all.
    ``fsync``: flush every file of a checkpoint to disk before publishing it (durable across power
    loss; costs time on very large checkpoints)."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: Optional[int] = 3, fsync: bool = True):
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / CHECKPOINTS_DIRNAME
        self.keep_last = keep_last
        self.fsync = fsync

    # -- paths ------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + ".tmp")

    @staticmethod
    def policy_dir(ckpt_dir: str | os.PathLike) -> Path:
        return Path(ckpt_dir) / POLICY_DIRNAME

    @staticmethod
    def learner_dir(ckpt_dir: str | os.PathLike) -> Path:
        return Path(ckpt_dir) / LEARNER_DIRNAME

    # -- writing ----------------------------------------------------------------------------------
    def begin(self, step: int) -> Path:
        """Create (afresh) and return ``checkpoints/step_N.tmp`` with an empty ``learner/``."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / LEARNER_DIRNAME).mkdir(parents=True)
        return tmp

    def save_policy(self, tmp_dir: str | os.PathLike, model: Any = None, processor: Any = None,
                    writer: Optional[Callable[[Path], Any]] = None) -> Path:
        """Write ``tmp_dir/policy`` from a model + processor or a ``writer(dir)`` callable."""
        return save_policy(self.policy_dir(tmp_dir), model=model, processor=processor, writer=writer)

    def write_trainer_state(self, tmp_dir: str | os.PathLike, state: dict[str, Any]) -> Path:
        return atomic_write_json(Path(tmp_dir) / TRAINER_STATE_NAME, state)

    def abort(self, tmp_dir: str | os.PathLike) -> None:
        """Throw away an uncommitted checkpoint."""
        shutil.rmtree(tmp_dir, ignore_errors=True)

    def commit(self, step: int, tmp_dir: str | os.PathLike) -> Path:
        """Publish ``tmp_dir`` as ``checkpoints/step_N``: fsync, rename, write the ``latest``
        marker, drop checkpoints of later steps (an abandoned timeline after a resume from an
        earlier step) and prune beyond ``keep_last``. Returns the committed directory."""
        tmp = Path(tmp_dir)
        final = self.step_dir(step)
        if tmp.resolve() != self.tmp_dir(step).resolve():
            raise ValueError(f"commit({step}) expects {self.tmp_dir(step)} (from begin({step})), got {tmp}")
        if not tmp.is_dir():
            raise FileNotFoundError(f"{tmp} does not exist: call begin({step}) first")
        state = load_trainer_state(tmp)  # refuse to publish a checkpoint without its trainer state
        if "step" in state and int(state["step"]) != int(step):
            raise ValueError(f"{tmp / TRAINER_STATE_NAME} says step {state['step']}, commit was asked for {step}")
        if self.fsync:
            _fsync_tree(tmp)
        _replace_dir(tmp, final)
        atomic_write_text(self.root / LATEST_NAME, final.name + "\n")
        self._cleanup(int(step))
        return final

    def save(self, step: int, trainer_state: dict[str, Any], model: Any = None, processor: Any = None,
             policy_writer: Optional[Callable[[Path], Any]] = None,
             learner_writer: Optional[Callable[[Path], Any]] = None) -> Path:
        """begin + policy + learner state + trainer state + commit, aborting on any error."""
        tmp = self.begin(step)
        try:
            if model is not None or policy_writer is not None:
                self.save_policy(tmp, model=model, processor=processor, writer=policy_writer)
            if learner_writer is not None:
                learner_writer(self.learner_dir(tmp))
            self.write_trainer_state(tmp, {"step": int(step), **trainer_state})
            return self.commit(step, tmp)
        except BaseException:
            self.abort(tmp)
            raise

    def _cleanup(self, committed: int) -> None:
        ckpts = self.list_checkpoints(complete_only=False)
        for step, path in ckpts:
            if step > committed:
                warnings.warn(f"removing {path}: it is from a later step than the checkpoint just committed "
                              f"(step {committed}), i.e. left by a run that was resumed from an earlier step")
                shutil.rmtree(path, ignore_errors=True)
        for p in self.root.iterdir():  # leftovers of crashed writes / replaced dirs
            m = _TMP_RE.match(p.name)
            if m and int(m.group(1)) <= committed and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
        if self.keep_last is None or self.keep_last <= 0:
            return
        for step, path in ckpts:  # older step dirs that never became complete checkpoints
            if step < committed and not is_complete_checkpoint(path):
                shutil.rmtree(path, ignore_errors=True)
        older = [(s, p) for s, p in ckpts if s < committed and p.exists()]
        excess = len(older) - (self.keep_last - 1)
        for _step, path in older[:max(0, excess)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------
    def list_checkpoints(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        """``[(step, dir)]`` of the ``step_N`` directories, ascending (``*.tmp`` never included)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            step = _parse_step(p.name)
            if step is None or not p.is_dir():
                continue
            if complete_only and not is_complete_checkpoint(p):
                continue
            out.append((step, p))
        return sorted(out)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint (highest step with a valid ``trainer_state.json``);
        incomplete ``*.tmp`` directories are ignored. None when there is none."""
        ckpts = self.list_checkpoints()
        return ckpts[-1][1] if ckpts else None

    def latest_step(self) -> Optional[int]:
        ckpts = self.list_checkpoints()
        return ckpts[-1][0] if ckpts else None

    @staticmethod
    def load_trainer_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
        return load_trainer_state(ckpt_dir)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a ``--resume DIR`` argument: a checkpoint directory itself, an output directory
    (its newest checkpoint) or a ``checkpoints`` directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    if _TMP_RE.match(path.name):
        raise ValueError(f"--resume {path}: this checkpoint is incomplete (its write did not finish); "
                         "pass the output directory to resume from the newest complete one")
    if (path / TRAINER_STATE_NAME).is_file():
        load_trainer_state(path)  # validates
        return path
    for root in (path, path.parent) if path.name == CHECKPOINTS_DIRNAME else (path,):
        found = CheckpointManager(root).latest()
        if found is not None:
            return found
    raise FileNotFoundError(f"--resume {path}: no complete checkpoint found (looked for "
                            f"{path / CHECKPOINTS_DIRNAME / 'step_N' / TRAINER_STATE_NAME})")


__all__ = [
    "CheckpointManager", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "capture_rng_state",
    "config_hash", "fsync_dir", "is_complete_checkpoint", "load_safetensors", "load_trainer_state", "read_json",
    "resolve_checkpoint", "restore_rng_state", "save_hf_policy", "save_policy", "save_safetensors",
    "step_dir_name",
]
