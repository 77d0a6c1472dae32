"""Reward functions for GRPO, registered by name, with per-function weights.

``fn(completions: list[str], samples: list[Sample], **kwargs) -> list[float]``, ``completions[i]`` answering
``samples[i]``; ``kwargs`` come from the spec (``{"name": "length", "kwargs": {"max_len": 512}}``); a function
declaring ``completion_lengths`` (or ``**kwargs``) also gets token counts. Built-ins: ``format``, ``format_rec``,
``accuracy`` (per-sample ``accu_reward_method``, scored as VLM-R1 does; docs/rewards.md: where we differ),
``repetition``, ``length`` (DAPO overlong penalty); ``package.module:function`` or ``path/to/file.py:function``
loads a user function. :class:`RewardSet` never lets one failing completion zero the batch: a function that
raises on the batch is re-run per sample; a sample that still raises (or is non-finite) scores 0, counted.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import re
import threading
import warnings
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from Levenshtein import ratio

from .types import Sample

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
RewardSpec = Union[str, Mapping[str, Any]]


def get_reward(name: str) -> RewardFn:
    """A registered reward by name, or a user function: ``package.module:function`` or
    ``path/to/file.py:function`` (a relative path starts at the current directory)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}; known: {sorted(REWARDS)} (or give a user function as "
                         "'package.module:function' or 'path/to/file.py:function')")
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {name!r} must look like 'package.module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):  # a file, loaded as a module named after it
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            obj: Any = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(obj)  # type: ignore[union-attr]
        else:
            obj = importlib.import_module(module_name)
        obj = reduce(getattr, attr.split("."), obj)
    except (ImportError, AttributeError, OSError) as e:
        raise ValueError(f"cannot import reward function {name!r}: {type(e).__name__}: {e}") from e
    if not callable(obj):
        raise ValueError(f"reward function {name!r} is not callable (got {type(obj).__name__})")
    return obj


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_FORMAT_REC_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>",
                            re.DOTALL)
_JSON_BLOCK_RE = re.compile(r"```json(.*?)```", re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_NUM_PATTERN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUM_PATTERN})"] * 4) + r"\s*\]")
_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_CHOICE_WORDS = "答案 选择 正确 是 对 ANSWER CORRECT CHOOSE SELECT RIGHT 认为 应该 觉得 THINK BELIEVE SHOULD".split()
_COCO_THRS = tuple(np.linspace(0.5, 0.95, 10))  # pycocotools' IoU thresholds


def extract_answer(text: str, last: bool = False) -> str:
    """The first (or last) ``<answer>...</answer>`` content, stripped, else the stripped text."""
    found = _ANSWER_RE.findall(text)
    return (found[-1] if last else found[0]).strip() if found else text.strip()


def clean_text(text: str) -> str:
    """VLM-R1's ``clean_text``: the last ``<answer>`` (else all), line breaks as spaces, stripped, lower,
    no dots at the end."""
    found = _ANSWER_RE.findall(text)
    text = re.sub(r"(?<!\s)[\n\r]", " ", re.sub(r"(?<=\s)[\n\r]", "", found[-1] if found else text))
    return text.strip().rstrip(".").lower()


def extract_choice(text: str, strict: bool = False) -> Optional[str]:
    """VLM-R1's ``extract_choice``: in the upper-cased text, a letter with no letter before and punctuation
    or the end after it; of several, the best by keywords (``answer``, ``think``...) near its first
    place, by that place and a dot after it. Unless ``strict``, if none: ``(B)`` anywhere, ``B)`` first."""
    text = re.sub(r"\s+", " ", text.upper())
    found = re.findall(r"(?<![A-Z])([A-Z])(?=[.,?!:;]|$)", text)
    def score(c: str) -> int:
        pos = text.find(c)
        near = text[max(0, pos - 20):pos + 20]
        end = pos < len(text) - 1 and text[pos + 1] in "。.!！,，"
        return found.count(c) * (sum(k in near for k in _CHOICE_WORDS) + 2 * (pos > len(text) * 0.7) + end)
    if found:
        return max(dict.fromkeys(found), key=score)
    m = None if strict else re.search(r"(?:^|\()([A-Z])\)", text)
    return m.group(1) if m else None


def extract_yes_no(text: str) -> Optional[str]:
    """``"yes"`` or ``"no"``: the first of the two words in the text (case-insensitive)."""
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return m.group(1).lower() if m else None


def extract_number(text: str) -> Optional[float]:
    """The first number in the text (``1,234.5``, ``-3``, ``2e3``), else a number word (``three``)."""
    m, words = _NUMBER_RE.search(text), [w for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS]
    return float(m.group(0).replace(",", "")) if m else float(_NUMBER_WORDS[words[0]]) if words else None


def extract_box(text: str) -> Optional[tuple[float, ...]]:
    """The first ``[x1, y1, x2, y2]`` in the text (also inside JSON such as ``{"bbox_2d": [...]}``)."""
    m = _BOX_RE.search(text)
    return tuple(float(g) for g in m.groups()) if m else None


def box_iou(a: Sequence[float], b: Sequence[float], min_side: float = 0.0) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0 unless they overlap by more
    than ``min_side`` in x and in y (VLM-R1's pixel ``iou`` counts overlaps over 1: ``min_side=1``)."""
    ix, iy = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if ix <= min_side or iy <= min_side:
        return 0.0
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def gold_text(sample: Sample) -> str:
    """The solution as VLM-R1's loader keeps it: every ``<answer>`` / ``</answer>`` removed, stripped."""
    return sample.solution.replace("<answer>", "").replace("</answer>", "").strip()


def _gold(extract: Callable[[str], Any], sample: Sample, what: str) -> Any:
    gold = extract(gold_text(sample))
    if gold is None:
        raise ValueError(f"no {what} in solution {sample.solution!r}")
    return gold


def _verify(answer: str, gold: str) -> bool:
    """Equal strings, or equal for math-verify (``verify(parse(answer), parse(gold))``, False if it fails)."""
    if answer == gold:
        return True
    try:
        from math_verify import parse, verify  # type: ignore[import-not-found]
    except ImportError:  # a warning shown once
        warnings.warn("math_verify is not installed: 'default' and 'math' accuracy skip symbolic checks "
                      "(pip install 'vlgrpo[math]')", stacklevel=1)
        return False
    # math_verify times out with SIGALRM, which only works in the main thread: disable it elsewhere.
    off_main = threading.current_thread() is not threading.main_thread()
    p_kw, v_kw = ({"parsing_timeout": None}, {"timeout_seconds": None}) if off_main else ({}, {})
    try:
        return float(verify(parse(answer, **p_kw), parse(gold, **p_kw), **v_kw)) > 0
    except Exception:  # noqa: BLE001 - as VLM-R1: a failed check is no match
        return False


def _acc_default(completion: str, sample: Sample) -> float:
    """VLM-R1's ``default_accuracy_reward``: 1 if math-verify finds the answers equal; else, if the
    solution has a digit, whether the cleaned texts are equal numbers (the Levenshtein ratio when
    one is no number); else, if it has an option letter, whether the letters match; else the ratio."""
    answer, gold = extract_answer(completion, last=True), gold_text(sample)
    if _verify(answer, gold):
        return 1.0
    a, g = clean_text(answer), clean_text(gold)
    if re.search(r"\d", gold):
        try:
            return float(float(a) == float(g))
        except ValueError:
            return ratio(a, g)
    letter = extract_choice(gold, strict=True)
    return float(extract_choice(answer, strict=True) == letter) if letter else ratio(a, g)


def _match(extract: Callable[[str], Any], what: str, same: Callable[[Any, Any], bool] = lambda p, g: p == g):
    """A method: is what ``extract`` reads in the first ``<answer>`` (else all) the solution's?"""
    def score(completion: str, sample: Sample) -> float:
        gold, pred = _gold(extract, sample, what), extract(extract_answer(completion))
        return float(pred is not None and same(pred, gold))
    return score


def _acc_iou(completion: str, sample: Sample) -> float:
    """VLM-R1's ``iou_reward``: pixel IoU of the first box in the first ``<answer>`` (0 without) with the
    solution's, the box rescaled from ``meta["input_size"]`` to ``meta["image_size"]`` when both are set."""
    gold, m = _gold(extract_box, sample, "[x1, y1, x2, y2] box"), _ANSWER_RE.search(completion)
    pred = extract_box(m.group(1)) if m else None
    if pred is None:
        return 0.0
    if sample.meta.get("image_size") is not None and sample.meta.get("input_size") is not None:
        (iw, ih), (w, h) = sample.meta["input_size"], sample.meta["image_size"]  # model-input -> image pixels
        pred = (pred[0] / iw * w, pred[1] / ih * h, pred[2] / iw * w, pred[3] / ih * h)
    return box_iou(pred, gold, min_side=1.0)


def _boxes(text: str, last: bool = True, gold: bool = False) -> list:
    """The items of the last (or first) ```json block in ``text``; [] if none or unparsable (``gold``: raise)."""
    blocks = _JSON_BLOCK_RE.findall(text)
    block = blocks[-1 if last else 0].strip() if blocks else ""
    try:
        return list(json.loads(block)) if block else []
    except (ValueError, TypeError):
        if gold:
            raise
        return []


def _acc_weighted_sum(completion: str, sample: Sample, thr: float = 0.5) -> float:
    """VLM-R1's ``weighted_sum``: boxes of the first ```json lists matched greedily by pixel IoU >= ``thr``;
    0.7 x IoU of the matches of right label per gold box + 0.3 x (1 - (missed + false fractions) / 2)."""
    pred, gold = clean_text(completion), clean_text(gold_text(sample))
    if gold == "none":
        return float(pred == "none")
    preds, gts = _boxes(pred, last=False), _boxes(gold, last=False, gold=True)
    if not preds or not gts:
        return float(not preds and not gts)
    def iou(p: Any, g: Any) -> float:
        try:
            return box_iou(p["bbox_2d"], g["bbox_2d"], min_side=1.0)
        except Exception:  # noqa: BLE001 - as VLM-R1: a malformed box overlaps nothing
            return 0.0
    ious = {(i, j): iou(p, g) for i, p in enumerate(preds) for j, g in enumerate(gts)}
    left_p, left_g, total = list(range(len(preds))), list(range(len(gts))), 0.0
    while left_p and left_g:  # the best pair left, first in (prediction, gold) order on ties
        i, j = max(((i, j) for i in left_p for j in left_g), key=ious.__getitem__)
        if ious[i, j] < thr:
            break
        total += ious[i, j] if preds[i].get("label") == gts[j].get("label") else 0.0
        left_p.remove(i)
        left_g.remove(j)
    return 0.7 * (total / len(gts)) + 0.3 * (1.0 - (len(left_g) / len(gts) + len(left_p) / len(preds)) / 2.0)


def coco_ap(preds: list, gts: list, iou_thrs: Sequence[float] = _COCO_THRS) -> float:
    """Box AP of one image as VLM-R1's ``calculate_map`` gets it from pycocotools (area 'all', 100 boxes
    per label, all scored 1, so in order): the mean over labels and ``iou_thrs`` of the 101-point
    interpolated precision. Unlike pycocotools, boxes of negative area are not ignored."""
    labels, dets = dict.fromkeys(g["label"] for g in gts), []
    for p in preds:
        try:  # as VLM-R1: another label, or a box whose area does not compute, is dropped
            b = p["bbox_2d"]
            if p["label"] in labels and math.isfinite((b[2] - b[0]) * (b[3] - b[1])):
                dets.append((p["label"], b))
        except (TypeError, KeyError, IndexError):
            pass
    if not dets:
        return 0.0
    precisions = []
    for label in labels:
        g = [x["bbox_2d"] for x in gts if x["label"] == label]
        for t in iou_thrs:
            taken, hits = set(), []
            for b in [b for lab, b in dets if lab == label][:100]:  # each takes the best free gold box
                best, m = min(t, 1 - 1e-10), None
                for j in range(len(g)):
                    if j not in taken and (v := box_iou(b, g[j])) >= best:
                        best, m = v, j
                taken.add(m)
                hits.append(m is not None)
            tp = np.cumsum(hits, dtype=float)
            prec = np.maximum.accumulate((tp / (np.arange(1, len(tp) + 1) + np.spacing(1)))[::-1])[::-1]
            idx = np.searchsorted(tp / len(g), np.linspace(0, 1, 101), side="left")
            precisions.append([prec[i] if i < len(prec) else 0.0 for i in idx])
    return float(np.mean(precisions))


def _acc_od(completion: str, sample: Sample, thrs: Sequence[float] = _COCO_THRS, per_box: bool = False,
            tags: bool = True) -> float:
    """VLM-R1's ``od_reward``, ``odLength_reward`` (``per_box``: times gold / predicted boxes if more are predicted),
    ``map_reward`` (not ``tags``): :func:`coco_ap` of the last ```json box lists (in the last ``<answer>``, 0
    without), 1 when both list nothing or both answers are ``None``."""
    gold = gold_text(sample)
    if tags:
        found = _ANSWER_RE.findall(completion)
        if not found:
            return 0.0
        completion = found[-1].strip()
        if completion == "None" == gold:
            return 1.0
    preds, gts = _boxes(completion), _boxes(gold, gold=True)
    ap = coco_ap(preds, gts, thrs) if preds and gts else float(not preds and not gts)
    return ap * (len(gts) / len(preds)) if per_box and len(preds) > len(gts) else ap


ACCURACY_METHODS: dict[str, Callable[[str, Sample], float]] = {
    "default": _acc_default, "mcq": _match(extract_choice, "option letter"), "yes_no": _match(extract_yes_no, "yes/no"),
    "numeric": _match(extract_number, "number", partial(math.isclose, rel_tol=1e-6, abs_tol=1e-9)),
    "math": lambda c, s: float(_verify(clean_text(c), clean_text(gold_text(s)))),  # VLM-R1's math_reward
    "all_match": lambda c, s: float(clean_text(c) == clean_text(gold_text(s))),
    "iou": _acc_iou, "weighted_sum": _acc_weighted_sum, "map": partial(_acc_od, tags=False),
    "od_ap": _acc_od, "od_ap50": partial(_acc_od, thrs=(0.5,)), "odLength": partial(_acc_od, per_box=True),
}


def accuracy_one(completion: str, sample: Sample) -> float:
    """Accuracy of one completion with the sample's ``accu_reward_method``. Raises ValueError for an
    unknown method or a solution it cannot read (a data error, counted by :class:`RewardSet`)."""
    method = sample.accu_reward_method or "default"
    if method not in ACCURACY_METHODS:
        raise ValueError(f"unknown accu_reward_method {method!r}; known: {sorted(ACCURACY_METHODS)}")
    return ACCURACY_METHODS[method](completion, sample)


def format_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    """1.0 when the whole (stripped) completion is ``<think>...</think> <answer>...</answer>``."""
    return [float(_FORMAT_RE.fullmatch(c.strip()) is not None) for c in completions]


def format_rec_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    """VLM-R1's ``format_reward_rec``: 1.0 if ``<think>..</think> <answer>..{..[x1, y1, x2, y2]..}..</answer>``."""
    return [float(_FORMAT_REC_RE.search(c) is not None) for c in completions]


def accuracy_reward(completions: list[str], samples: list[Sample]) -> list[float]:
    return [accuracy_one(c, s) for c, s in zip(completions, samples, strict=True)]


def repetition_penalty(text: str) -> float:
    """VLM-R1's repetition penalty in [-1, 0]: -(1 - distinct / all) over the boxes (``bbox_2d``, ``label``)
    of a JSON box list (```json or ``` block, else bare), else over the lower-cased 6-word n-grams."""
    a = _JSON_BLOCK_RE.search(text)
    m = a or re.search(r"```(.*?)```", text, re.DOTALL)
    block = m.group(1).strip() if m else ""
    if not block and not a:
        m = re.search(r'\[\s*{.*?"bbox_2d".*?"label".*?}\s*\]', text, re.DOTALL)
        block = m.group(0) if m else ""
    try:
        data = json.loads(block) if block else None
    except ValueError:  # VLM-R1 tries json_repair here
        data = None
    words = text.lower().split()
    items = ([f"{x['bbox_2d']}_{x['label']}" for x in data if "bbox_2d" in x and "label" in x]
             if data and isinstance(data, list) else list(zip(*[words[i:] for i in range(6)])))
    return -(1 - len(set(items)) / len(items)) if items else 0.0


def length_reward(completions: list[str], samples: list[Sample], max_len: int = 1024, cache: Optional[int] = None,
                  completion_lengths: Optional[Sequence[int]] = None) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to ``max_len - cache`` (default ``max_len // 4``), linear down to -1 at
    ``max_len``, -1 beyond; in tokens given ``completion_lengths`` (as RewardSet does), else in characters."""
    cache = max_len // 4 if cache is None else cache
    if not 0 < cache <= max_len:
        raise ValueError(f"length reward needs 0 < cache <= max_len (got cache={cache}, max_len={max_len})")
    lengths = completion_lengths if completion_lengths is not None else [len(c) for c in completions]
    return [max(-1.0, min(0.0, (max_len - cache - n) / cache)) for n in lengths]


REWARDS: dict[str, RewardFn] = {  # the built-ins, by name (get_reward)
    "format": format_reward, "format_rec": format_rec_reward, "accuracy": accuracy_reward,
    "repetition": lambda completions, samples: [repetition_penalty(c) for c in completions], "length": length_reward}


@dataclass
class _Entry:
    name: str
    fn: RewardFn
    weight: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    takes_lengths: bool = False


def _parse_spec(spec: RewardSpec) -> _Entry:
    if isinstance(spec, str):
        spec = {"name": spec}
    if "name" not in spec:
        raise ValueError(f"reward spec {dict(spec)!r} has no 'name'")
    if unknown := set(spec) - {"name", "weight", "kwargs", "label"}:
        raise ValueError(f"reward spec {dict(spec)!r}: unknown keys {sorted(unknown)}")
    fn = get_reward(str(spec["name"]))
    try:  # does it take completion_lengths (or **kwargs)?
        takes = any(p.name == "completion_lengths" or p.kind is inspect.Parameter.VAR_KEYWORD
                    for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read
        takes = False
    return _Entry(name=str(spec.get("label") or spec["name"]), fn=fn, weight=float(spec.get("weight", 1.0)),
                  kwargs=dict(spec.get("kwargs") or {}), takes_lengths=takes)


class RewardSet:
    """Weighted reward functions, scored together. ``specs``: names (``"accuracy"``) or dicts ``{"name",
    "weight"=1.0, "kwargs"={}, "label"=name}`` (``label`` tells apart two entries of one function)."""

    def __init__(self, specs: Sequence[RewardSpec]):
        if isinstance(specs, (str, Mapping)):
            specs = [specs]
        self.entries = [_parse_spec(s) for s in specs]
        if not self.entries:
            raise ValueError("RewardSet needs at least one reward function")
        self.names, self.weights = [e.name for e in self.entries], [e.weight for e in self.entries]
        if dupes := sorted({n for n in self.names if self.names.count(n) > 1}):
            raise ValueError(f"duplicate reward names {dupes}: give each a distinct 'label'")
        self._logged: set[tuple[str, bool]] = set()  # (name, on the batch): warned once

    def score(self, completions: Sequence[str], samples: Sequence[Sample],
              completion_lengths: Optional[Sequence[int]] = None,
              ) -> tuple[torch.Tensor, list[str], list[float], dict[str, int]]:
        """Score ``completions[i]`` against ``samples[i]`` with every function: ``(rewards [N, F] float32 unweighted,
        names, weights, errors)``, ``errors[name]`` counting the completions that function failed on (scored
        0). ``completion_lengths`` (tokens) reach functions that take them."""
        completions, samples = list(completions), list(samples)
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        if completion_lengths is not None and len(completion_lengths) != len(completions):
            raise ValueError(f"{len(completion_lengths)} completion_lengths for {len(completions)} completions")
        results = [self._score_one(entry, completions, samples, completion_lengths) for entry in self.entries]
        errors = {entry.name: n_err for entry, (_, n_err) in zip(self.entries, results)}
        rewards = torch.tensor([v for v, _ in results], dtype=torch.float32)  # [F, N]
        return rewards.T.contiguous(), self.names, self.weights, errors

    def _score_one(self, entry: _Entry, completions: list[str], samples: list[Sample],
                   lengths: Optional[Sequence[int]]) -> tuple[list[float], int]:
        """One function over the batch; on failure, sample by sample so one bad row costs one 0."""
        try:
            out = self._call(entry, completions, samples, lengths) if completions else []
        except Exception as e:  # noqa: BLE001 - user code may raise anything
            self._log(entry, e, batch=True)
            out = []
            for i, (c, s) in enumerate(zip(completions, samples)):
                try:
                    out += self._call(entry, [c], [s], None if lengths is None else [lengths[i]])
                except Exception as e:  # noqa: BLE001
                    self._log(entry, e, batch=False)
                    out.append(None)
        return [0.0 if v is None else v for v in out], sum(v is None for v in out)

    def _call(self, entry: _Entry, completions: list[str], samples: list[Sample], lengths) -> list[Optional[float]]:
        """``entry.fn`` on these rows as floats, None (logged) for a non-finite one."""
        kwargs = dict(entry.kwargs)
        if entry.takes_lengths and lengths is not None:
            kwargs["completion_lengths"] = list(lengths)
        values = list(entry.fn(completions, samples, **kwargs))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} completion(s)")
        values = [float(v) for v in values]
        for v in values:
            if not math.isfinite(v):
                self._log(entry, ValueError(f"non-finite reward {v}"), batch=False)
        return [v if math.isfinite(v) else None for v in values]

    def _log(self, entry: _Entry, err: Exception, batch: bool) -> None:
        """Warn once per function and kind of failure (the counts go to the metrics)."""
        if (key := (entry.name, batch)) in self._logged:
            return
        self._logged.add(key)
        where = "on the batch (retrying per sample)" if batch else "on a sample (scored 0)"
        logger.warning("reward %r raised %s: %s: %s", entry.name, where, type(err).__name__, err)
