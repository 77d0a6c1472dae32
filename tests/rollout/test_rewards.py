"""Reward functions on real strings, including malformed answers, RewardSet's error handling, user
functions by module or file, and unknown methods refused at load time. Case-by-case agreement with
VLM-R1's own code is in test_reward_parity.py."""
from __future__ import annotations

import json
import logging
import sys
import textwrap

from types import SimpleNamespace

import pytest
import torch

from vlgrpo.rollout import rewards as R
from vlgrpo.rollout.data import DataSource, load_datasets
from vlgrpo.rollout.rewards import RewardSet, get_reward
from vlgrpo.rollout.types import Sample


def S(solution: str, method: str = "default", **meta) -> Sample:
    return Sample(sample_id="s", prompt=[], images=[], solution=solution, accu_reward_method=method, meta=meta)


def acc(completion: str, sample: Sample) -> float:
    return R.accuracy_reward([completion], [sample])[0]


# ------------------------------------------------------------------------------------ format


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>it is red</think><answer>red</answer>", 1.0),
        ("<think>multi\nline</think>\n\n<answer>red</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>red</answer>", 0.0),  # no think
        ("<think>x</think>", 0.0),  # no answer
        ("<think>x</think><answer>red", 0.0),  # unclosed answer
        ("<think>x<answer>red</answer>", 0.0),  # unclosed think
        ("<think>x</think><answer>red</answer> trailing", 0.0),
        ("preamble <think>x</think><answer>red</answer>", 0.0),
        ("<answer>red</answer><think>x</think>", 0.0),  # wrong order
        ("red", 0.0),
        ("", 0.0),
    ],
)
def test_format(text, expected):
    assert R.format_reward([text], [S("red")]) == [expected]


# ------------------------------------------------------------------------------------ default


@pytest.mark.parametrize(
    "text, expected",
    [
        ("red", 1.0),
        ("  Red. ", 1.0),  # cleaned: stripped, lower-cased, end dots dropped
        ("<think>hmm</think><answer> RED </answer>", 1.0),
        ("<answer>x</answer><answer>red</answer>", 1.0),  # the last <answer> counts
        ("<answer>blue</answer>", 2 / 7),  # Levenshtein ratio: 2 * 1 common letter / (4 + 3)
        ("<answer>red", 6 / 14),  # unclosed tag: the whole completion is the answer
        ("", 0.0),
    ],
)
def test_accuracy_default_text_is_fuzzy(text, expected):
    assert acc(text, S("red")) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, solution, expected",
    [
        ("3.0", "3", 1.0), ("1,000", "1000", 1.0), ("12 cm", "12", 1.0),  # math-verify
        ("13", "12", 0.0),  # both numbers, different: 0, no partial credit
        ("x12y", "12", 4 / 6),  # not a number: Levenshtein ratio
        ("C. a dog", "C", 1.0), ("B", "C", 0.0),  # the solution is an option letter
        ("A small dog.", "<answer> A small dog. </answer>", 1.0),  # the tags of the solution are dropped
    ],
)
def test_accuracy_default_numbers_and_letters(text, solution, expected):
    pytest.importorskip("math_verify")
    assert acc(text, S(solution)) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ mcq


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B. a cat", 1.0),
        ("<think>...</think><answer>B) cat</answer>", 1.0),
        ("The answer is B", 1.0),
        ("answer: (B)", 1.0),
        ("I pick option (B) here", 1.0),
        ("b", 1.0),  # upper-cased first
        ("C", 0.0),
        ("A or B", 1.0),  # two letters: VLM-R1's heuristic prefers the one near the end
        ("a cat", 0.0),  # no letter
        ("Apple", 0.0),
        ("<answer></answer>", 0.0),
        ("", 0.0),
    ],
)
def test_accuracy_mcq(text, expected):
    assert acc(text, S("B", "mcq")) == expected


def test_mcq_solution_forms():
    assert acc("C", S("<answer> (C) a dog </answer>", "mcq")) == 1.0
    with pytest.raises(ValueError, match="option letter"):
        acc("C", S("a dog", "mcq"))


# ------------------------------------------------------------------------------------ yes/no


@pytest.mark.parametrize(
    "text, expected",
    [("yes", 1.0), ("Yes.", 1.0), ("<answer>YES, it is</answer>", 1.0), ("no", 0.0),
     ("yesterday", 0.0), ("maybe", 0.0), ("", 0.0)],
)
def test_accuracy_yes_no(text, expected):
    assert acc(text, S("Yes", "yes_no")) == expected


# ------------------------------------------------------------------------------------ numeric


@pytest.mark.parametrize(
    "text, solution, expected",
    [
        ("3", "3", 1.0),
        ("<answer>There are 3 shapes</answer>", "3", 1.0),
        ("3.0000000001", "3", 1.0),  # within rel tol 1e-6
        ("3.01", "3", 0.0),
        ("1,234.5", "1234.5", 1.0),
        ("-2", "-2", 1.0),
        ("2", "-2", 0.0),
        ("three", "3", 1.0),
        ("0", "0", 1.0),
        ("many", "3", 0.0),
        ("", "3", 0.0),
        ("4 then 3", "3", 0.0),  # first number counts
    ],
)
def test_accuracy_numeric(text, solution, expected):
    assert acc(text, S(solution, "numeric")) == expected


# ------------------------------------------------------------------------------------ math


def test_math_without_math_verify_compares_the_cleaned_texts_and_warns(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails
    with pytest.warns(UserWarning, match="math_verify is not installed"):
        assert acc("<answer>42.</answer>", S("42", "math")) == 1.0
        assert acc("<answer>42.0</answer>", S("42", "math")) == 0.0  # math-verify would say equal


def test_math_uses_math_verify_when_present(monkeypatch):
    calls = []

    def parse(text, **kw):
        calls.append(text)
        return text.replace(" ", "").replace("\\frac{1}{2}", "0.5")

    def verify(pred, gold, **kw):
        return pred == gold

    monkeypatch.setitem(sys.modules, "math_verify", SimpleNamespace(parse=parse, verify=verify))
    assert acc("<answer>\\frac{1}{2}</answer>", S("0.5", "math")) == 1.0
    assert acc("<answer>1/3</answer>", S("0.5", "math")) == 0.0
    assert calls[:2] == ["\\frac{1}{2}", "0.5"]  # verify(parse(answer), parse(solution)), as VLM-R1


def test_math_real_math_verify_if_installed():
    pytest.importorskip("math_verify")
    assert acc("<answer>$\\frac{1}{2}$</answer>", S("$0.5$", "math")) == 1.0
    assert acc("<answer>$3$</answer>", S("$0.5$", "math")) == 0.0


# ------------------------------------------------------------------------------------ iou


def test_iou_rescales_from_input_to_original_size():
    # model input 100x50, original 200x100: x and y scale by 2
    meta = {"image_size": (200, 100), "input_size": (100, 50)}
    assert acc("<answer>[10, 10, 30, 30]</answer>", S("[20, 20, 60, 60]", "iou", **meta)) == pytest.approx(1.0)
    # pred -> [20,20,60,60]; gold [40,20,80,60]: inter 20*40=800, union 1600+1600-800=2400
    assert acc("<answer>[10, 10, 30, 30]</answer>", S("[40, 20, 80, 60]", "iou", **meta)) == pytest.approx(1 / 3)


def test_iou_non_uniform_scale_and_json_box():
    meta = {"image_size": (300, 100), "input_size": (100, 100)}  # sx=3, sy=1
    text = '<think>x</think><answer>{"bbox_2d": [10, 10, 20.5, 20], "label": "cat"}</answer>'
    # pred -> [30, 10, 61.5, 20]; gold [30, 10, 60, 20]: inter 30*10=300, union 315
    assert acc(text, S("[30, 10, 60, 20]", "iou", **meta)) == pytest.approx(300 / 315)


def test_iou_without_sizes_is_not_rescaled():
    assert acc("<answer>[0, 0, 10, 10]</answer>", S("[0, 0, 10, 10]", "iou", image_size=(640, 480))) == 1.0
    assert acc("<answer>[0, 0, 10, 10]</answer>", S("[5, 0, 15, 10]", "iou")) == pytest.approx(50 / 150)


@pytest.mark.parametrize(
    "text",
    ["", "no box", "[10, 10, 30, 30]",  # a box outside <answer> does not count (VLM-R1)
     "<answer>[1, 2, 3]</answer>", "<answer>[a, b, c, d]</answer>", "<answer>[10, 10, 30",
     "<answer>[30, 30, 10, 10]</answer>", "<answer>[5, 5, 5, 5]</answer>",
     "<answer>[29, 10, 50, 30]</answer>"],  # overlaps by 1 pixel in x: VLM-R1's pixel IoU counts none
)
def test_iou_garbage_boxes_score_zero(text):
    assert acc(text, S("[10, 10, 30, 30]", "iou")) == 0.0


def test_box_iou_hand_values():
    assert R.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert R.box_iou([0, 0, 2, 2], [1, 1, 3, 3], min_side=1) == 0.0  # overlap 1 x 1
    assert R.box_iou([0, 0, 3, 3], [1, 1, 4, 4], min_side=1) == pytest.approx(4 / 14)
    assert R.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0


def test_unknown_accuracy_method_raises():
    with pytest.raises(ValueError, match="unknown accu_reward_method 'nope'"):
        acc("x", S("x", "nope"))


# ------------------------------------------------------------------------------------ length


def test_length_overlong_penalty_chars():
    comps = ["a" * n for n in (0, 60, 75, 90, 100, 150)]
    out = R.length_reward(comps, [S("x")] * len(comps), max_len=100, cache=40)
    assert out == pytest.approx([0.0, 0.0, -15 / 40, -30 / 40, -1.0, -1.0])


def test_length_uses_token_counts_through_rewardset():
    rs = RewardSet([{"name": "length", "kwargs": {"max_len": 10, "cache": 4}}])
    comps = ["short", "a very long completion indeed"]
    # by characters: 5 -> 0, 29 -> -1; by tokens: 8 -> -0.5, 2 -> 0
    r_chars, *_ = rs.score(comps, [S("x")] * 2)
    r_tok, *_ = rs.score(comps, [S("x")] * 2, completion_lengths=[8, 2])
    assert r_chars[:, 0].tolist() == pytest.approx([0.0, -1.0])
    assert r_tok[:, 0].tolist() == pytest.approx([-0.5, 0.0])


def test_length_bad_config_is_counted():
    rs = RewardSet([{"name": "length", "kwargs": {"max_len": 10, "cache": 0}}])
    rewards, _, _, errors = rs.score(["a"], [S("x")])
    assert errors == {"length": 1} and rewards.tolist() == [[0.0]]


# ------------------------------------------------------------------------------------ box lists, repetition, format_rec


def test_detection_methods_on_a_perfect_and_an_empty_answer():
    gold = '```json\n[{"bbox_2d": [10, 10, 50, 50], "label": "cat"}, {"bbox_2d": [60, 60, 90, 90], "label": "dog"}]\n```'
    perfect = f"<think>t</think><answer>{gold}</answer>"
    for method in ("weighted_sum", "map", "od_ap", "od_ap50", "odLength"):
        assert acc(perfect, S(gold, method)) == pytest.approx(1.0, abs=1e-9), method
        assert acc("<answer>```json\n[]\n```</answer>", S(gold, method)) == 0.0, method
        assert acc("<answer>None</answer>", S("None", method)) == 1.0, method


def test_detection_solution_that_does_not_parse_is_a_counted_error():
    rs = RewardSet(["accuracy"])
    rewards, _, _, errors = rs.score(["<answer>x</answer>"] * 2, [S("```json [1, 2 ```", "od_ap"), S("ok")])
    assert rewards[:, 0].tolist() == [0.0, 0.0] and errors == {"accuracy": 1}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a b c d e f", 0.0),  # one 6-gram, distinct
        ("a b c d e f " * 3, -(1 - 6 / 13)),  # 13 6-grams, 6 distinct
        ("too short", 0.0),
        ('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```', -0.5),
        ('boxes: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "a"}] done', 0.0),
    ],
)
def test_repetition(text, expected):
    assert R.REWARDS["repetition"]([text], [S("x")]) == [pytest.approx(expected)]


def test_format_rec():
    good = '<think>look</think><answer>{"bbox_2d": [1, 2, 3, 4], "label": "cat"}</answer>'
    assert R.format_rec_reward([good, good.replace("1, 2", "1.5, 2"), "<answer>[1, 2, 3, 4]</answer>"],
                               [S("x")] * 3) == [1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------ RewardSet


def test_rewardset_scores_matrix_names_weights():
    rs = RewardSet(["accuracy", {"name": "format", "weight": 0.5}])
    comps = ["<think>t</think><answer>red</answer>", "red", "blue"]
    samples = [S("red")] * 3
    rewards, names, weights, errors = rs.score(comps, samples)
    assert names == ["accuracy", "format"] and weights == [1.0, 0.5]
    assert rewards.dtype == torch.float32 and rewards.shape == (3, 2)
    assert rewards.tolist() == [[1.0, 1.0], [1.0, 0.0], [pytest.approx(2 / 7), 0.0]]  # blue ~ red: ratio
    assert errors == {"accuracy": 0, "format": 0}


def test_rewardset_mixed_methods_in_one_batch():
    rs = RewardSet(["accuracy"])
    samples = [S("B", "mcq"), S("no", "yes_no"), S("4", "numeric"), S("[0,0,10,10]", "iou")]
    comps = ["(B)", "No.", "4", "<answer>[0, 0, 10, 5]</answer>"]
    rewards, *_ = rs.score(comps, samples)
    assert rewards[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])


def test_rewardset_bad_solution_counts_one_error_only():
    rs = RewardSet(["accuracy"])
    rewards, _, _, errors = rs.score(["B", "B", "C"], [S("B", "mcq"), S("no letter", "mcq"), S("C", "mcq")])
    assert rewards[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert errors == {"accuracy": 1}


def _write_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    pkg = tmp_path / "userrewards"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m.startswith("userrewards")]:
        monkeypatch.delitem(sys.modules, mod)


def test_user_function_dotted_import(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "mine", """
        def exclaim(completions, samples, bonus=1.0):
            return [bonus if c.endswith("!") else 0.0 for c in completions]
    """)
    rs = RewardSet([{"name": "userrewards.mine:exclaim", "weight": 2.0, "kwargs": {"bonus": 0.25}}])
    rewards, names, weights, errors = rs.score(["hi!", "hi"], [S("x"), S("x")])
    assert names == ["userrewards.mine:exclaim"] and weights == [2.0]
    assert rewards[:, 0].tolist() == [0.25, 0.0] and errors == {"userrewards.mine:exclaim": 0}


def test_raising_user_function_is_counted_and_scores_zero(tmp_path, monkeypatch, caplog):
    _write_module(tmp_path, monkeypatch, "flaky", """
        def picky(completions, samples):
            out = []
            for c in completions:
                if "boom" in c:
                    raise RuntimeError("cannot score " + c)
                out.append(1.0)
            return out

        def nan(completions, samples):
            return [float("nan") if c == "x" else 0.5 for c in completions]
    """)
    rs = RewardSet(["userrewards.flaky:picky", {"name": "userrewards.flaky:nan", "label": "nan"}, "accuracy"])
    with caplog.at_level(logging.WARNING, logger="vlgrpo.rollout.rewards"):
        rewards, names, _, errors = rs.score(["ok", "boom", "x", "ok"], [S("ok")] * 4)
    assert names == ["userrewards.flaky:picky", "nan", "accuracy"]
    assert rewards[:, 0].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert rewards[:, 1].tolist() == [0.5, 0.5, 0.0, 0.5]
    assert rewards[:, 2].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1.0])  # unaffected (ratio "boom" ~ "ok")
    assert errors == {"userrewards.flaky:picky": 1, "nan": 1, "accuracy": 0}
    assert any("cannot score boom" in r.message for r in caplog.records)


def test_wrong_length_output_is_counted(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "short", """
        def one(completions, samples):
            return [1.0]
    """)
    rewards, _, _, errors = RewardSet(["userrewards.short:one"]).score(["a", "b"], [S("x")] * 2)
    # per-sample retry succeeds, since each call then has one completion
    assert rewards[:, 0].tolist() == [1.0, 1.0] and errors == {"userrewards.short:one": 0}


def test_user_function_import_errors_name_the_string(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "mine", "def f(c, s):\n    return [0.0]*len(c)\n")
    with pytest.raises(ValueError, match="no_such_pkg.mod:fn"):
        RewardSet(["no_such_pkg.mod:fn"])
    with pytest.raises(ValueError, match="userrewards.mine:missing"):
        RewardSet(["userrewards.mine:missing"])
    with pytest.raises(ValueError, match="package.module:function"):
        get_reward("userrewards.mine:")


def test_user_function_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(completions, samples, bonus=1.0):\n"
                                            "    return [bonus if c.isupper() else 0.0 for c in completions]\n")
    rs = RewardSet([{"name": f"{tmp_path / 'my_rewards.py'}:shout", "kwargs": {"bonus": 2.0}}])
    assert rs.score(["HI", "hi"], [S("x")] * 2)[0][:, 0].tolist() == [2.0, 0.0]
    monkeypatch.chdir(tmp_path.parent)  # a relative path starts at the current directory
    assert get_reward(f"{tmp_path.name}/my_rewards.py:shout")(["A"], [S("x")]) == [1.0]
    with pytest.raises(ValueError, match="missing.py:shout"):
        get_reward(f"{tmp_path / 'missing.py'}:shout")
    with pytest.raises(ValueError, match="my_rewards.py:whisper"):
        get_reward(f"{tmp_path / 'my_rewards.py'}:whisper")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as ei:
        RewardSet(["acuracy"])
    msg = str(ei.value)
    assert "acuracy" in msg and all(n in msg for n in ("accuracy", "format", "format_rec", "length", "repetition"))
    assert "choice" not in R.REWARDS  # removed: it was won by repeating an option word


def test_spec_validation():
    with pytest.raises(ValueError, match="duplicate"):
        RewardSet(["format", "format"])
    with pytest.raises(ValueError, match="unknown keys"):
        RewardSet([{"name": "format", "wieght": 2}])
    with pytest.raises(ValueError, match="completions for"):
        RewardSet(["format"]).score(["a", "b"], [S("x")])


def test_empty_batch():
    rewards, names, _, errors = RewardSet(["format", "accuracy"]).score([], [])
    assert rewards.shape == (0, 2) and errors == {"format": 0, "accuracy": 0}


def test_registered_custom_reward(monkeypatch):
    monkeypatch.setitem(R.REWARDS, "const", lambda c, s, value=1.0: [value] * len(c))
    rewards, *_ = RewardSet([{"name": "const", "kwargs": {"value": 0.3}}]).score(["a"], [S("x")])
    assert rewards.tolist() == [[pytest.approx(0.3)]]


# ------------------------------------------------------------------------------------ load-time checks


def test_unknown_accu_reward_method_is_refused_at_load_time(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]},
            {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
             "accu_reward_method": "od_ap"},
            {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
             "accu_reward_method": "llm"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError) as ei:
        load_datasets(DataSource(path))
    msg = str(ei.value)
    assert f"{path}:3: unknown accu_reward_method 'llm'" in msg and "\n" not in msg
    assert all(m in msg for m in R.ACCURACY_METHODS)
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    assert [load_datasets(DataSource(path))[i].accu_reward_method for i in (0, 1)] == ["default", "od_ap"]
    with pytest.raises(ValueError, match=":1: unknown accu_reward_method 'nope'"):  # a file's default, too
        load_datasets(DataSource(path, accu_reward_method="nope"))
