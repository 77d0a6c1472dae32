"""Reward functions for GRPO and a registry of them by name, with per-function weights.

``fn(completions: list[str], samples: list[Sample], **kwargs) -> list[float]``: ``completions[i]``
answers ``samples[i]``; ``kwargs`` come from the spec (``{"name": "length", "kwargs": {"max_len":
512}}``); a function declaring ``completion_lengths`` (or ``**kwargs``) also gets token counts.
Built-ins: ``format``, ``accuracy`` (per-sample ``accu_reward_method`` like VLM-R1: ``default``,
``mcq``, ``yes_no``, ``numeric``, ``math``, ``iou``), ``length`` (DAPO overlong penalty) and
``choice`` (shaping for the synthetic tasks); ``package.module:function`` imports a user function.
:class:`RewardSet` never lets one failing completion zero the batch: a function that raises on the
batch is re-run per sample, and a sample that still raises (or is non-finite) scores 0, counted.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .types import Sample

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
RewardSpec = Union[str, Mapping[str, Any]]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available to :class:`RewardSet` under ``name``."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function given as ``package.module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return _import_function(name)
    raise ValueError(
        f"unknown reward function {name!r}; known: {sorted(REWARDS)} "
        "(or give a user function as 'package.module:function')"
    )


def _import_function(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {path!r}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"reward function {path!r} is not callable (got {type(obj).__name__})")
    return obj


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_NUM_PATTERN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUM_PATTERN})"] * 4) + r"\s*\]")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
_TAG_RE = re.compile(r"</?\w+>")
_EDGE_PUNCT = " \t\r\n.,;:!?\"'`()[]{}"


def extract_answer(text: str) -> str:
    """Content of the first ``<answer>...</answer>`` (stripped), else the whole stripped text."""
    m = _ANSWER_RE.search(text)
    return (m.group(1) if m else text).strip()


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding punctuation (for exact-match rewards)."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCT)


def extract_choice(text: str) -> Optional[str]:
    """The option letter A-E of a multiple-choice answer, or None if absent or ambiguous.

    Accepts ``B``, ``(B)``, ``B.``, ``B: cat``, ``The answer is B``, ``Option (C)``; a lone capital
    letter elsewhere counts only when exactly one distinct letter appears.
    """
    s = text.strip()
    patterns = (
        r"^\(?([A-E])(?:\)|[.:]|$)",  # "B", "(B)", "B.", "B: cat", "B) cat"
        r"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\b",  # "The answer is B"
        r"\(([A-E])\)",  # "... (C) ..."
    )
    for pat in patterns:
        m = re.search(pat, s)
        if m:
            return m.group(1)
    letters = set(re.findall(r"\b([A-E])\b", s))
    return letters.pop() if len(letters) == 1 else None


def extract_yes_no(text: str) -> Optional[str]:
    """``"yes"`` or ``"no"``: the first of the two words in the text (case-insensitive)."""
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return m.group(1).lower() if m else None


def extract_number(text: str) -> Optional[float]:
    """The first number in the text (``1,234.5``, ``-3``, ``2e3``), else a number word (``three``)."""
    m = _NUMBER_RE.search(text)
    if m:
        return float(m.group(0).replace(",", ""))
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def extract_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first ``[x1, y1, x2, y2]`` in the text (also inside JSON such as ``{"bbox_2d": [...]}``)."""
    m = _BOX_RE.search(text)
    if not m:
        return None
    x1, y1, x2, y2 = (float(g) for g in m.groups())
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0 for degenerate boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def rescale_box(
    box: Sequence[float], input_size: Sequence[float], image_size: Sequence[float]
) -> tuple[float, float, float, float]:
    """Map a box from model-input pixels (``input_size`` = w, h) to the original image (w, h)."""
    sx = float(image_size[0]) / float(input_size[0])
    sy = float(image_size[1]) / float(input_size[1])
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _acc_default(answer: str, sample: Sample) -> float:
    return float(normalize_text(answer) == normalize_text(extract_answer(sample.solution)))


def _gold(extract: Callable[[str], Any], sample: Sample, what: str) -> Any:
    gold = extract(extract_answer(sample.solution))
    if gold is None:
        raise ValueError(f"no {what} in solution {sample.solution!r}")
    return gold


def _acc_mcq(answer: str, sample: Sample) -> float:
    return float(extract_choice(answer) == _gold(extract_choice, sample, "option letter"))


def _acc_yes_no(answer: str, sample: Sample) -> float:
    return float(extract_yes_no(answer) == _gold(extract_yes_no, sample, "yes/no"))


def _acc_numeric(answer: str, sample: Sample) -> float:
    gold, pred = _gold(extract_number, sample, "number"), extract_number(answer)
    return float(pred is not None and math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9))


_math_verify_warned = False


def _load_math_verify() -> Optional[tuple[Callable, Callable]]:
    try:
        from math_verify import parse, verify  # type: ignore[import-not-found]
    except ImportError:
        return None
    return parse, verify


def _acc_math(answer: str, sample: Sample) -> float:
    mv = _load_math_verify()
    if mv is None:
        global _math_verify_warned
        if not _math_verify_warned:
            _math_verify_warned = True
            logger.warning("math_verify is not installed; 'math' accuracy falls back to 'numeric' "
                           "(pip install 'vlgrpo[math]')")
        return _acc_numeric(answer, sample)
    parse, verify = mv
    # math_verify times out with SIGALRM, which only works in the main thread: disable it elsewhere.
    in_main = threading.current_thread() is threading.main_thread()
    parse_kw: dict[str, Any] = {} if in_main else {"parsing_timeout": None}
    verify_kw: dict[str, Any] = {} if in_main else {"timeout_seconds": None}
    gold = parse(sample.solution, **parse_kw)
    pred = parse(answer, **parse_kw)
    return float(bool(verify(gold, pred, **verify_kw)))


def _acc_iou(answer: str, sample: Sample) -> float:
    gold, pred = _gold(extract_box, sample, "[x1, y1, x2, y2] box"), extract_box(answer)
    if pred is None:
        return 0.0
    image_size, input_size = sample.meta.get("image_size"), sample.meta.get("input_size")
    if image_size is not None and input_size is not None:
        pred = rescale_box(pred, input_size, image_size)
    return box_iou(pred, gold)


ACCURACY_METHODS: dict[str, Callable[[str, Sample], float]] = {
    "default": _acc_default,
    "mcq": _acc_mcq,
    "yes_no": _acc_yes_no,
    "numeric": _acc_numeric,
    "math": _acc_math,
    "iou": _acc_iou,
}


def accuracy_one(completion: str, sample: Sample) -> float:
    """Accuracy of one completion with the sample's ``accu_reward_method``.

    Raises ValueError for an unknown method or a solution the method cannot read (a data error,
    counted by :class:`RewardSet`); a malformed *completion* simply scores 0.
    """
    method = sample.accu_reward_method or "default"
    try:
        scorer = ACCURACY_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown accu_reward_method {method!r}; known: {sorted(ACCURACY_METHODS)}") from None
    return scorer(extract_answer(completion), sample)


@register_reward("format")
def format_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    """1.0 when the whole (stripped) completion is ``<think>...</think> <answer>...</answer>``."""
    return [float(_FORMAT_RE.fullmatch(c.strip()) is not None) for c in completions]


@register_reward("accuracy")
def accuracy_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    """Per-sample accuracy, dispatched on ``sample.accu_reward_method`` (see ``ACCURACY_METHODS``).

    The answer is the content of ``<answer>`` if present, else the whole completion. ``iou``
    rescales the predicted box from ``meta["input_size"]`` to ``meta["image_size"]`` when both are
    set (both ``(w, h)``) and returns the IoU with the solution box (original coordinates).
    """
    return [accuracy_one(c, s) for c, s in zip(completions, samples, strict=True)]


@register_reward("length")
def length_reward(
    completions: list[str],
    samples: list[Sample],
    max_len: int = 1024,
    cache: Optional[int] = None,
    completion_lengths: Optional[Sequence[int]] = None,
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to ``max_len - cache``, then linear down to -1 at
    ``max_len``, and -1 beyond.

    Length is in tokens when the caller passes ``completion_lengths`` (``RewardSet.score`` does so
    when given them), otherwise in characters. ``cache`` defaults to ``max_len // 4``.
    """
    cache = max_len // 4 if cache is None else cache
    if not 0 < cache <= max_len:
        raise ValueError(f"length reward needs 0 < cache <= max_len (got cache={cache}, max_len={max_len})")
    lengths = completion_lengths if completion_lengths is not None else [len(c) for c in completions]
    start = max_len - cache
    return [max(-1.0, min(0.0, (start - n) / cache)) for n in lengths]


@register_reward("choice")
def choice_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    """Fraction of the completion's words that are one of ``sample.meta["options"]``.

    A dense shaping reward for the synthetic tasks (say the option words at all); case-insensitive,
    words are runs of letters/digits, tags such as ``<answer>`` are not words. A completion without
    words scores 0.
    """
    out = []
    for c, s in zip(completions, samples, strict=True):
        options = s.meta.get("options")
        if not options:
            raise ValueError(f"choice reward needs meta['options'] (sample {s.sample_id!r})")
        allowed = {str(o).lower() for o in options}
        words = re.findall(r"\w+", _TAG_RE.sub(" ", c.lower()))
        out.append(sum(w in allowed for w in words) / len(words) if words else 0.0)
    return out


@dataclass
class _Entry:
    name: str
    fn: RewardFn
    weight: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    takes_lengths: bool = False


def _accepts(fn: Callable, param: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == param or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _parse_spec(spec: RewardSpec) -> _Entry:
    if isinstance(spec, str):
        spec = {"name": spec}
    if "name" not in spec:
        raise ValueError(f"reward spec {dict(spec)!r} has no 'name'")
    unknown = set(spec) - {"name", "weight", "kwargs", "label"}
    if unknown:
        raise ValueError(f"reward spec {dict(spec)!r}: unknown keys {sorted(unknown)}")
    fn = get_reward(str(spec["name"]))
    return _Entry(
        name=str(spec.get("label") or spec["name"]),
        fn=fn,
        weight=float(spec.get("weight", 1.0)),
        kwargs=dict(spec.get("kwargs") or {}),
        takes_lengths=_accepts(fn, "completion_lengths"),
    )


class RewardSet:
    """Several weighted reward functions, scored together.

    ``specs``: names (``"accuracy"``) or dicts ``{"name", "weight"=1.0, "kwargs"={}, "label"=name}``;
    ``label`` tells apart two entries of the same function. Unknown names raise ValueError listing
    the known ones; user functions ``package.module:function`` are imported here, at construction.
    """

    def __init__(self, specs: Sequence[RewardSpec]):
        if isinstance(specs, (str, Mapping)):
            specs = [specs]
        self.entries = [_parse_spec(s) for s in specs]
        if not self.entries:
            raise ValueError("RewardSet needs at least one reward function")
        names = self.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate reward names {dupes}: give each a distinct 'label'")
        self._logged: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.entries]

    def score(
        self,
        completions: Sequence[str],
        samples: Sequence[Sample],
        completion_lengths: Optional[Sequence[int]] = None,
    ) -> tuple[torch.Tensor, list[str], list[float], dict[str, int]]:
        """Score ``completions[i]`` against ``samples[i]`` with every function.

        Returns ``(rewards [N, F] float32 unweighted, names, weights, errors)`` where ``errors[name]``
        counts the completions that function failed on (they score 0). ``completion_lengths`` (token
        counts) reach functions that accept a ``completion_lengths`` parameter.
        """
        completions, samples = list(completions), list(samples)
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        if completion_lengths is not None and len(completion_lengths) != len(completions):
            raise ValueError(f"{len(completion_lengths)} completion_lengths for {len(completions)} completions")
        columns, errors = [], {}
        for entry in self.entries:
            values, n_err = self._score_one(entry, completions, samples, completion_lengths)
            columns.append(values)
            errors[entry.name] = n_err
        rewards = torch.tensor(columns, dtype=torch.float32).reshape(len(self.entries), len(completions)).T
        return rewards.contiguous(), self.names, self.weights, errors

    def _score_one(
        self,
        entry: _Entry,
        completions: list[str],
        samples: list[Sample],
        lengths: Optional[Sequence[int]],
    ) -> tuple[list[float], int]:
        """One function over the batch; on failure, sample by sample so one bad row costs one 0."""
        if not completions:
            return [], 0
        try:
            values = self._call(entry, completions, samples, lengths)
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            out = [self._finite(entry, v) for v in values]
            return [0.0 if v is None else v for v in out], sum(v is None for v in out)
        except Exception as e:  # noqa: BLE001 - user code may raise anything
            self._log(entry, e, batch=True)
        out, n_err = [], 0
        for i, (c, s) in enumerate(zip(completions, samples)):
            try:
                vals = self._call(entry, [c], [s], None if lengths is None else [lengths[i]])
                if len(vals) != 1:
                    raise ValueError(f"returned {len(vals)} values for 1 completion")
                v = self._finite(entry, vals[0])
            except Exception as e:  # noqa: BLE001
                self._log(entry, e, batch=False)
                v = None
            n_err += v is None
            out.append(0.0 if v is None else v)
        return out, n_err

    @staticmethod
    def _call(entry: _Entry, completions: list[str], samples: list[Sample], lengths) -> list[float]:
        kwargs = dict(entry.kwargs)
        if entry.takes_lengths and lengths is not None:
            kwargs["completion_lengths"] = list(lengths)
        return list(entry.fn(completions, samples, **kwargs))

    def _finite(self, entry: _Entry, value: Any) -> Optional[float]:
        v = float(value)
        if math.isfinite(v):
            return v
        self._log(entry, ValueError(f"non-finite reward {v}"), batch=False)
        return None

    def _log(self, entry: _Entry, err: Exception, batch: bool) -> None:
        """Warn once per function and kind of failure (the counts go to the metrics)."""
        key = f"{entry.name}:{'batch' if batch else 'sample'}"
        if key in self._logged:
            return
        self._logged.add(key)
        where = "on the batch (retrying per sample)" if batch else "on a sample (scored 0)"
        logger.warning("reward %r raised %s: %s: %s", entry.name, where, type(err).__name__, err)
