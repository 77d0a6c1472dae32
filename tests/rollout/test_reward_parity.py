"""Parity with VLM-R1: every ``accu_reward_method`` and the ``format_rec``, ``repetition`` and
``format`` rewards score as VLM-R1's own code does, case by case.

Each table row is (completion, solution as our JSONL row holds it, VLM-R1's value). Every value is
checked twice: ``vlgrpo.rollout.rewards`` must give it, and VLM-R1's own functions must give it too.
Those are taken with ``ast`` out of unmodified copies of VLM-R1's sources in ``vlmr1_ref/`` (commit
and licence in vlmr1_ref/README.md) and run here on VLM-R1's inputs: the solution as its loader
builds it (``<answer> {answer without tags} </answer>``), completions as chat messages. That half
is skipped where math-verify, Levenshtein or pycocotools is missing.

Where we differ on purpose (docs/rewards.md lists each difference), ``DIFFERENCES`` states our value
and VLM-R1's, and both are checked.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import re
import warnings
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from vlgrpo.rollout import rewards as R
from vlgrpo.rollout.data import DataSource, load_datasets
from vlgrpo.rollout.types import Sample

REF = Path(__file__).with_name("vlmr1_ref")


def _functions(file: str, ns: dict, names=None, cls=None) -> dict:
    """Define the top-level functions of ``file`` (or the methods of class ``cls``) in ``ns``."""
    with warnings.catch_warnings():  # their "\\%" string escapes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse((REF / file).read_text(encoding="utf-8"))
        body = tree.body if cls is None else next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
        nodes = [n for n in body if isinstance(n, ast.FunctionDef) and (names is None or n.name in names)]
        for n in nodes:
            n.decorator_list = []  # @staticmethod
        exec(compile(ast.Module(nodes, type_ignores=[]), str(REF / file), "exec"), ns)
    return ns


class VLMR1:
    """VLM-R1's reward functions with what their module tops would import."""

    def __init__(self, tmp: Path):
        mv = pytest.importorskip("math_verify")
        ratio = pytest.importorskip("Levenshtein").ratio
        coco = pytest.importorskip("pycocotools.coco")
        cocoeval = pytest.importorskip("pycocotools.cocoeval")

        class COCO(coco.COCO):  # VLM-R1's copy of pycocotools takes the dataset as a dict
            def __init__(self, dataset=None):
                super().__init__()
                if dataset is not None:
                    self.dataset = dataset
                    self.createIndex()

        def repair_json(text):  # json_repair is not a dependency here: cases that need it say so
            raise ValueError("json_repair is not installed")

        math_ns = _functions("math_utils.py", {"parse": mv.parse, "verify": mv.verify})
        self.ns = _functions("grpo_jsonl.py", {
            "re": re, "json": json, "math": math, "os": os, "datetime": datetime, "parse": mv.parse,
            "verify": mv.verify, "ratio": ratio, "COCO": COCO, "COCOeval": cocoeval.COCOeval,
            "repair_json": repair_json, "compute_score": math_ns["compute_score"]})
        self.qwen = _functions("qwen_module.py", {"Image": Image}, ["iou_reward", "format_reward_rec"], "Qwen2VLModule")
        self.tmp = tmp

    @staticmethod
    def solution(raw: str) -> str:  # grpo_jsonl.py main(): tags removed, then wrapped
        return f"<answer> {raw.replace('<answer>', '').replace('</answer>', '').strip()} </answer>"

    def accuracy(self, method: str, completion: str, solution: str) -> float:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            return self.ns["accuracy_reward"]([[{"content": completion}]], [self.solution(solution)],
                                              accu_reward_method=[method])[0]

    def iou(self, completion: str, solution: str, image_size, input_size) -> float:
        path = self.tmp / f"{image_size[0]}x{image_size[1]}.png"
        Image.new("RGB", image_size).save(path)
        grid = [1, input_size[1] // 14, input_size[0] // 14]  # Qwen2.5-VL: 14-pixel patches
        return self.qwen["iou_reward"]([[{"content": completion}]], [self.solution(solution)],
                                       image_grid_thw=[grid], image_path=[[str(path)]])[0]

    def reward(self, name: str, completion: str) -> float:
        chat = [[{"content": completion}]]
        if name == "format_rec":
            return self.qwen["format_reward_rec"](chat)[0]
        if name == "format":
            return self.ns["format_reward"](chat)[0]
        return self.ns["repetition_rewards"](chat, ["unused"])[0]


@pytest.fixture(scope="module")
def vlmr1(tmp_path_factory):
    return VLMR1(tmp_path_factory.mktemp("vlmr1"))


def ours(method: str, completion: str, solution: str, **meta) -> float:
    return R.accuracy_one(completion, Sample("s", [], [], solution, method, meta))


def _box(*items) -> str:
    return "```json\n" + json.dumps([{"bbox_2d": b, "label": lab} for b, lab in items]) + "\n```"


# ------------------------------------------------------------------------------ text methods

TEXT_CASES = {
    "default": [
        ("<think>x</think><answer>3.0</answer>", "3", 1.0),  # math-verify
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>12 cm</answer>", "12", 1.0),
        ("<answer>$\\frac{1}{2}$</answer>", "0.5", 1.0),
        ("13", "12", 0.0),  # both numbers: equal or not
        ("x12y", "12", 4 / 6),  # not a number: Levenshtein ratio
        ("<answer>red</answer>", "red", 1.0),
        ("<answer>Red.</answer>", "red", 1.0),
        ("<answer>blue</answer>", "red", 2 / 7),
        ("<answer>a red square</answer>", "red", 6 / 15),
        ("<answer>1</answer><answer>red</answer>", "red", 1.0),  # the last <answer>
        ("<answer>red", "red", 6 / 14),
        ("", "red", 0.0),
        ("C. a dog", "C", 1.0),  # the solution is an option letter
        ("B", "C", 0.0),
        ("(C)", "C", 0.0),
        ("It is C, I think.", "C", 1.0),
        ("A small dog.", "<answer> A small dog. </answer>", 1.0),
        ("<answer>line1\nline2</answer>", "line1 line2", 1.0),
        ("<answer>cat</answer>", "a cat", 6 / 8),
    ],
    "mcq": [
        ("B", "B", 1.0), ("b", "B", 1.0), ("B.", "B", 1.0), ("B: a cat", "B", 1.0),
        ("The answer is B", "B", 1.0), ("<think>A?</think><answer>B</answer>", "B", 1.0), ("C", "B", 0.0),
        ("A or B", "B", 1.0),  # several letters: VLM-R1's keyword / position heuristic
        ("A or B, I think A.", "B", 1.0),  # (it looks at the first place of each letter)
        ("a cat", "B", 0.0), ("Apple", "B", 0.0), ("", "B", 0.0), ("<answer></answer>", "B", 0.0),
        ("The answer is C.", "C", 1.0), ("答案是C。", "C", 0.0), ("B. a cat", "<answer>B. a cat</answer>", 1.0),
    ],
    "yes_no": [
        ("yes", "Yes", 1.0), ("Yes.", "yes", 1.0), ("<answer>YES, it is</answer>", "Yes", 1.0), ("no", "Yes", 0.0),
        ("maybe", "Yes", 0.0), ("", "Yes", 0.0), ("<think>no</think><answer>yes</answer>", "yes", 1.0),
        ("No, it is not.", "no", 1.0),
    ],
    "math": [
        ("<answer>$\\frac{1}{2}$</answer>", "$0.5$", 1.0), ("<answer>\\boxed{4}</answer>", "4", 1.0),
        ("<answer>3</answer>", "$0.5$", 0.0), ("<answer>x+1</answer>", "1+x", 0.0),
        ("<answer>Red.</answer>", "red", 1.0), ("<answer>10\\%</answer>", "10", 1.0), ("<answer>k=3</answer>", "3", 1.0),
    ],
    "all_match": [
        ("<answer>Click the OK button.</answer>", "click the ok button", 1.0),
        ("<answer>click ok</answer>", "click the ok button", 0.0), ("line\nbreak", "line break", 1.0), ("", "x", 0.0),
    ],
}
TEXT_PARAMS = [pytest.param(m, c, s, v, id=f"{m}-{i}") for m, cases in TEXT_CASES.items() for i, (c, s, v) in enumerate(cases)]


@pytest.mark.parametrize("method, completion, solution, value", TEXT_PARAMS)
def test_text_methods_ours(method, completion, solution, value):
    pytest.importorskip("math_verify")  # 'default' and 'math' use it first, as VLM-R1 does
    assert ours(method, completion, solution) == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("method, completion, solution, value", TEXT_PARAMS)
def test_text_methods_vlmr1(vlmr1, method, completion, solution, value):
    assert vlmr1.accuracy(method, completion, solution) == pytest.approx(value, rel=1e-9)


# ------------------------------------------------------------------------------ box lists

GOLD = _box(([10, 10, 50, 50], "cat"), ([60, 60, 100, 90], "dog"))
BOX_CASES = {  # name: (completion, solution, {method: VLM-R1's value})
    "perfect": (f"<think>t</think><answer>{GOLD}</answer>", GOLD,
                dict(weighted_sum=1.0, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=1.0)),
    "one of two": (f"<answer>{_box(([10, 10, 50, 50], 'cat'))}</answer>", GOLD,
                   dict(weighted_sum=0.575, map=0.5, od_ap=0.5, od_ap50=0.5, odLength=0.5)),
    "shifted": (f"<answer>{_box(([12, 12, 52, 52], 'cat'), ([60, 60, 100, 90], 'dog'))}</answer>", GOLD,
                dict(weighted_sum=0.937813211845, map=0.85, od_ap=0.85, od_ap50=1.0, odLength=0.85)),
    "wrong label": (f"<answer>{_box(([10, 10, 50, 50], 'dog'), ([60, 60, 100, 90], 'dog'))}</answer>", GOLD,
                    dict(weighted_sum=0.65, map=0.25, od_ap=0.25, od_ap50=0.25, odLength=0.25)),
    "extra boxes": (f"<answer>{_box(([10, 10, 50, 50], 'cat'), ([60, 60, 100, 90], 'dog'), ([0, 0, 5, 5], 'cat'), ([70, 0, 90, 20], 'dog'))}</answer>",
                    GOLD, dict(weighted_sum=0.925, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=0.5)),
    "repeated": (f"<answer>{_box(([10, 10, 50, 50], 'cat'), ([10, 10, 50, 50], 'cat'), ([60, 60, 100, 90], 'dog'))}</answer>",
                 GOLD, dict(weighted_sum=0.95, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=2 / 3)),
    "miss first": (f"<answer>{_box(([0, 0, 5, 5], 'cat'), ([10, 10, 50, 50], 'cat'), ([60, 60, 100, 90], 'dog'))}</answer>",
                   GOLD, dict(weighted_sum=0.95, map=0.75, od_ap=0.75, od_ap50=0.75, odLength=0.5)),
    "empty list": ("<answer>```json\n[]\n```</answer>", GOLD,
                   dict(weighted_sum=0.0, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "no json": ("<answer>a cat and a dog</answer>", GOLD,
                dict(weighted_sum=0.0, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "bad json": ('<answer>```json\n[{"bbox_2d": [10, 10, 50, 50], "label": "cat"\n```</answer>', GOLD,
                 dict(weighted_sum=0.0, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "no answer tag": (GOLD, GOLD, dict(weighted_sum=1.0, map=1.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "None both": ("<answer>None</answer>", "None", dict(weighted_sum=1.0, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=1.0)),
    "None gold": (f"<answer>{_box(([1, 1, 9, 9], 'cat'))}</answer>", "None",
                  dict(weighted_sum=0.0, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "empty both": ("<answer>```json\n[]\n```</answer>", "```json\n[]\n```",
                   dict(weighted_sum=1.0, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=1.0)),
    "other label": (f"<answer>{_box(([10, 10, 50, 50], 'bird'))}</answer>", GOLD,
                    dict(weighted_sum=0.225, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "no bbox": ('<answer>```json\n[{"label": "cat"}]\n```</answer>', GOLD,
                dict(weighted_sum=0.0, map=0.0, od_ap=0.0, od_ap50=0.0, odLength=0.0)),
    "label case": (f"<answer>{_box(([10, 10, 50, 50], 'Cat'), ([60, 60, 100, 90], 'dog'))}</answer>", GOLD,
                   dict(weighted_sum=1.0, map=0.5, od_ap=0.5, od_ap50=0.5, odLength=0.5)),  # weighted_sum lower-cases
    "two answers": (f"<answer>{_box(([0, 0, 5, 5], 'cat'))}</answer> then <answer>{GOLD}</answer>", GOLD,
                    dict(weighted_sum=1.0, map=1.0, od_ap=1.0, od_ap50=1.0, odLength=1.0)),
}
BOX_PARAMS = [pytest.param(m, c, s, v, id=f"{m}-{name}")
              for name, (c, s, values) in BOX_CASES.items() for m, v in values.items()]


@pytest.mark.parametrize("method, completion, solution, value", BOX_PARAMS)
def test_box_list_methods_ours(method, completion, solution, value):
    assert ours(method, completion, solution) == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("method, completion, solution, value", BOX_PARAMS)
def test_box_list_methods_vlmr1(vlmr1, method, completion, solution, value):
    assert vlmr1.accuracy(method, completion, solution) == pytest.approx(value, rel=1e-9)


def test_coco_ap_matches_pycocotools_on_random_box_lists(vlmr1):
    """Many random lists (labels, near misses, repeats, extra boxes; no negative-area box, see
    DIFFERENCES): our AP equals pycocotools' through VLM-R1's ``calculate_map``."""
    import random

    rng = random.Random(0)
    for _ in range(100):
        gold = [{"bbox_2d": [x, y, x + rng.randint(2, 40), y + rng.randint(2, 40)], "label": rng.choice("ab")}
                for x, y in ((rng.randint(0, 60), rng.randint(0, 60)) for _ in range(rng.randint(1, 4)))]
        pred = [{"bbox_2d": [max(0, v + rng.randint(-4, 4)) for v in g["bbox_2d"]], "label": rng.choice("abb")}
                for g in rng.choices(gold, k=rng.randint(1, 6))]
        pred = [p for p in pred if p["bbox_2d"][2] >= p["bbox_2d"][0] and p["bbox_2d"][3] >= p["bbox_2d"][1]]
        if not pred:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            for stat, thrs in ((0, R._COCO_THRS), (1, (0.5,))):
                assert R.coco_ap(pred, gold, thrs) == pytest.approx(vlmr1.ns["calculate_map"](pred, gold, stat), abs=1e-12)


# ------------------------------------------------------------------------------ iou (REC)

IOU_CASES = [  # completion, solution, image (w, h), model input (w, h), VLM-R1's value
    ("<answer>[10, 10, 30, 30]</answer>", "[20, 20, 60, 60]", (200, 100), (112, 56), 0.6445871024219433),
    ("<answer>[10, 10, 30, 30]</answer>", "[20, 20, 60, 60]", (224, 112), (112, 56), 1.0),
    ('<think>t</think><answer>{"bbox_2d": [10, 10, 30, 30], "label": "cat"}</answer>', "[40, 20, 80, 60]",
     (224, 112), (112, 56), 1 / 3),
    ("<answer>[10,10,30,30] or [0,0,5,5]</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 1.0),  # the first box
    ("[10, 10, 30, 30]", "[10, 10, 30, 30]", (112, 112), (112, 112), 0.0),  # no <answer>
    ("<answer>[29, 10, 50, 30]</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 0.0),  # 1-pixel overlap
    ("<answer>[28, 10, 50, 30]</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 40 / 800),
    ("<answer>[30, 30, 10, 10]</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 0.0),
    ("<answer>[1, 2, 3]</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 0.0),
    ("<answer>none</answer>", "[10, 10, 30, 30]", (112, 112), (112, 112), 0.0),
    ("<answer>[100, 50, 600, 400]</answer>", "[90, 45, 610, 420]", (640, 480), (644, 476), 0.8993563980776258),
]


@pytest.mark.parametrize("completion, solution, image_size, input_size, value", IOU_CASES)
def test_iou_ours(completion, solution, image_size, input_size, value):
    got = ours("iou", completion, solution, image_size=image_size, input_size=input_size)
    assert got == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("completion, solution, image_size, input_size, value", IOU_CASES)
def test_iou_vlmr1(vlmr1, completion, solution, image_size, input_size, value):
    assert vlmr1.iou(completion, solution, image_size, input_size) == pytest.approx(value, rel=1e-12)


# ------------------------------------------------------------------------------ other rewards

REWARD_CASES = [  # reward, completion, VLM-R1's value
    ("format_rec", '<think>look</think><answer>{"bbox_2d": [1, 2, 3, 4], "label": "cat"}</answer>', 1.0),
    ("format_rec", 'x <think>a</think>\n<answer>[{"bbox_2d": [1,2,3,4]}]</answer> y', 1.0),  # searched
    ("format_rec", '<think>a</think><answer>{"bbox_2d": [1.5, 2, 3, 4]}</answer>', 0.0),  # integers only
    ("format_rec", "<think>a</think><answer>[1, 2, 3, 4]</answer>", 0.0),  # no {...}
    ("format_rec", '<answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', 0.0),
    ("format", "<think>a</think><answer>b</answer>", 1.0),
    ("format", "<think>a\nb</think>\n\n<answer>c</answer>", 1.0),
    ("format", "<think>a</think><answer>b</answer> c", 0.0),
    ("format", "<answer>b</answer>", 0.0),
    ("repetition", "", 0.0),
    ("repetition", "one two three four five", 0.0),
    ("repetition", "a b c d e f", 0.0),
    ("repetition", "a b c d e f a b c d e f a b c d e f", -(1 - 6 / 13)),
    ("repetition", "The cat sat. the CAT sat. the cat sat. the cat sat.", -(1 - 3 / 7)),
    ("repetition", _box(([1, 2, 3, 4], "a"), ([1, 2, 3, 4], "a"), ([5, 6, 7, 8], "a")), -(1 - 2 / 3)),
    ("repetition", "```\n" + json.dumps([{"bbox_2d": [1, 2, 3, 4], "label": "a"}] * 4) + "\n```", -0.75),
    ("repetition", "boxes: " + json.dumps([{"bbox_2d": [1, 2, 3, 4], "label": "a"}] * 2) + " ok", -0.5),
    ("repetition", "```json\n[]\n``` a b c d e f a b c d e f", -(1 - 9 / 10)),  # empty list: all words' 6-grams
    ("repetition", "```json\n" + json.dumps([{"bbox_2d": [1, 2, 3, 4]}] * 3) + "\n```", 0.0),  # no labels
]


@pytest.mark.parametrize("reward, completion, value", REWARD_CASES)
def test_rewards_ours(reward, completion, value):
    assert R.REWARDS[reward]([completion], [Sample("s", [], [], "x")]) == [pytest.approx(value, rel=1e-12)]


@pytest.mark.parametrize("reward, completion, value", REWARD_CASES)
def test_rewards_vlmr1(vlmr1, reward, completion, value):
    assert vlmr1.reward(reward, completion) == pytest.approx(value, rel=1e-12)


# ------------------------------------------------------------------------------ our deliberate differences
# One row per line of the table in docs/rewards.md: (id, method, completion, solution, ours, VLM-R1's).
# ERROR: we raise, so RewardSet scores 0 and counts the data error; CRASH: VLM-R1's function raises
# (its training run stops).
ERROR, CRASH = "error", "crash"
INVERTED = '```json\n[{"bbox_2d": [50, 10, 10, 50], "label": "cat"}, {"bbox_2d": [10, 10, 50, 50], "label": "cat"}]\n```'
ONE_CAT = _box(([10, 10, 50, 50], "cat"))
DIFFERENCES = [
    ("mcq-parens", "mcq", "(B)", "B", 1.0, 0.0),
    ("mcq-paren-start", "mcq", "<answer>B) a cat</answer>", "B", 1.0, 0.0),
    ("mcq-gold-parens", "mcq", "C", "(C) a dog", 1.0, 0.0),
    ("mcq-gold-no-letter", "mcq", "C", "a dog", ERROR, 0.0),
    ("yes_no-not", "yes_no", "not sure", "no", 0.0, 1.0),
    ("yes_no-yesterday", "yes_no", "yesterday", "yes", 0.0, 1.0),
    ("yes_no-know", "yes_no", "I know", "no", 0.0, 1.0),
    ("yes_no-gold-neither", "yes_no", "maybe", "perhaps", ERROR, 1.0),
    ("math-dfrac", "math", "<answer>\\dfrac{1}{2}</answer>", "\\frac{1}{2}", 0.0, 1.0),
    ("math-frac12", "math", "<answer>0.5</answer>", "\\frac12", 0.0, 1.0),
    ("math-boxed-text", "math", "<answer>\\boxed{red}</answer>", "red", 0.0, 1.0),
    ("math-spaces", "math", "<answer>a b</answer>", "ab", 0.0, 1.0),
    ("default-multiline-gold", "default", "A", "A\nB", 0.0, 0.5),
    ("numeric-own-method", "numeric", "<answer>three</answer>", "3", 1.0, 0.0),
    ("iou-float-box", "iou", "<answer>[10.5, 10, 30, 30]</answer>", "[10, 10, 30, 30]", 19.5 / 20, 0.0),
    ("iou-space-box", "iou", "<answer>[ 10, 10, 30, 30 ]</answer>", "[10, 10, 30, 30]", 1.0, 0.0),
    ("iou-gold-json-object", "iou", "<answer>[10, 10, 30, 30]</answer>", '{"bbox_2d": [10, 10, 30, 30]}', 1.0, 0.0),
    ("od-inverted-prediction", "od_ap", f"<answer>{INVERTED}</answer>", ONE_CAT, 0.5, 1.0),
    ("od-inverted-gold", "od_ap", f"<answer>{ONE_CAT}</answer>", INVERTED, 51 / 101, 1.0),  # recall <= 1/2
    ("od-only-inverted-gold", "od_ap50", f"<answer>{ONE_CAT}</answer>", _box(([50, 10, 10, 50], "cat")), 0.0, -1.0),
    ("od-gold-unparsable", "od_ap", f"<answer>{ONE_CAT}</answer>", "```json\n[{]\n```", ERROR, CRASH),
    ("weighted_sum-no-label", "weighted_sum", '<answer>```json\n[{"bbox_2d": [10, 10, 50, 50]}]\n```</answer>',
     ONE_CAT, 0.3, CRASH),
    ("weighted_sum-gold-unparsable", "weighted_sum", f"<answer>{ONE_CAT}</answer>", "```json\n[{]\n```", ERROR, CRASH),
]


def _ours_or_error(method, completion, solution):
    try:
        return ours(method, completion, solution, image_size=(112, 112), input_size=(112, 112))
    except ValueError:
        return ERROR


@pytest.mark.parametrize("method, completion, solution, our_value, their_value",
                         [pytest.param(*d[1:], id=d[0]) for d in DIFFERENCES])
def test_differences_ours(method, completion, solution, our_value, their_value):
    pytest.importorskip("math_verify")
    got = _ours_or_error(method, completion, solution)
    assert got == (our_value if our_value == ERROR else pytest.approx(our_value, rel=1e-12))


@pytest.mark.parametrize("method, completion, solution, our_value, their_value",
                         [pytest.param(*d[1:], id=d[0]) for d in DIFFERENCES])
def test_differences_vlmr1(vlmr1, method, completion, solution, our_value, their_value):
    if their_value == CRASH:
        with pytest.raises(Exception):  # noqa: B017 - whatever VLM-R1 raises, its run stops
            vlmr1.accuracy(method, completion, solution)
    elif method == "iou":
        assert vlmr1.iou(completion, solution, (112, 112), (112, 112)) == their_value
    else:
        assert vlmr1.accuracy(method, completion, solution) == pytest.approx(their_value, rel=1e-12)


def test_difference_format_strips_whitespace(vlmr1):
    text = "<think>a</think><answer>b</answer>\n"
    assert R.format_reward([text], [Sample("s", [], [], "x")]) == [1.0]
    assert vlmr1.reward("format", text) == 0.0  # VLM-R1 full-matches the unstripped text


def test_difference_repetition_of_broken_json(vlmr1):
    text = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"},]\n```'
    assert R.REWARDS["repetition"]([text], [Sample("s", [], [], "x")]) == [0.0]  # its 6-word n-grams are distinct
    # VLM-R1 repairs the JSON with json_repair (the trailing comma goes): two identical boxes, -(1 - 1/2).
    try:
        import json_repair  # noqa: F401
    except ImportError:
        assert vlmr1.reward("repetition", text) == 0.0  # without json_repair it falls back to the n-grams too
    else:
        vlmr1.ns["repair_json"] = json_repair.repair_json
        assert vlmr1.reward("repetition", text) == -0.5


def test_difference_length_is_another_reward(vlmr1):
    """VLM-R1's ``length`` reward is ``cosine_rewards``: it sets the accuracy to 1.0 before use, so it
    is a cosine of the token count alone (1.0 for a short text); ours is DAPO's overlong penalty."""
    tokenizer = type("T", (), {"encode": staticmethod(lambda text: text.split())})
    assert vlmr1.ns["cosine_reward"]("a short answer", tokenizer, acc_reward=0.0) == pytest.approx(1.0, abs=1e-4)
    assert R.REWARDS["length"](["a short answer"], [Sample("s", [], [], "x")], max_len=100, cache=20) == [0.0]


def test_difference_loader_keeps_rows_with_a_number_answer_out(tmp_path):
    """VLM-R1 reads a gpt turn whose value is a number as its text ("3"); our loader skips the row
    (``no_answer``) and counts it."""
    rows = [{"conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": v}]} for v in ("3", 3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_datasets(DataSource(path))
    assert len(ds) == 1 and ds.skipped == {"no_answer": 1}
