"""VLM-R1 JSONL datasets (several files, bad rows counted), the resumable sampler, and the
synthetic tasks loading cleanly with pixels that match their answers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlgrpo.modules import Video
from vlgrpo.rollout.data import DataSource, PromptSampler, build_prompt, load_datasets
from vlgrpo.rollout.rewards import RewardSet
from vlgrpo.rollout.synthetic import COLORS, TASKS, make_dataset


def write_png(path: Path, size=(40, 30), color=(10, 20, 30), noise: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
    else:
        Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def row(image, question="<image>What is it?", answer="a cat", **extra) -> dict:
    r = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        r["image"] = image
    return r


# ------------------------------------------------------------------------------------ loading


def test_several_files_with_own_folders_and_methods(tmp_path):
    write_png(tmp_path / "imgs_a" / "x.png", size=(40, 30))
    write_png(tmp_path / "imgs_b" / "sub" / "1.png", size=(20, 10), color=(255, 0, 0))
    write_png(tmp_path / "imgs_b" / "sub" / "2.png", size=(8, 8))
    a = write_jsonl(tmp_path / "a.jsonl", [
        row("x.png", id=7),
        row(None, question="Is 2 > 1?", answer="yes", accu_reward_method="yes_no"),
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [
        row(["sub/1.png", "sub/2.png"], question="Compare <image> with <image>.", answer="B", options=["A", "B"]),
    ])
    ds = load_datasets([DataSource(a, tmp_path / "imgs_a"), DataSource(b, tmp_path / "imgs_b", "mcq")])
    assert len(ds) == 3 and ds.num_skipped == 0 and ds.skipped == {}
    assert [r.meta["source"] for r in ds.records] == [str(a), str(a), str(b)]

    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert s0.sample_id == "7" and s0.solution == "a cat" and s0.accu_reward_method == "default"
    assert s0.prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert len(s0.images) == 1 and s0.images[0].mode == "RGB" and s0.meta["image_size"] == (40, 30)

    assert s1.sample_id == "a:2" and s1.images == [] and "image_size" not in s1.meta
    assert s1.accu_reward_method == "yes_no"  # row's own method
    assert s1.prompt[0]["content"] == [{"type": "text", "text": "Is 2 > 1?"}]

    assert s2.accu_reward_method == "mcq"  # the source's default
    assert s2.prompt[0]["content"] == [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
        {"type": "image"}, {"type": "text", "text": "."},
    ]
    assert [im.size for im in s2.images] == [(20, 10), (8, 8)] and s2.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert s2.meta["image_size"] == (20, 10) and s2.meta["options"] == ["A", "B"]


def test_image_folder_defaults_to_file_dir_and_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (5, 5), 128).save(tmp_path / "g.png")
    ds = load_datasets(DataSource(write_jsonl(tmp_path / "d.jsonl", [row("g.png")])))
    assert ds[0].images[0].mode == "RGB" and ds[0].images[0].getpixel((1, 1)) == (128, 128, 128)


def test_build_prompt_placeholders():
    content = lambda q, n: build_prompt(q, n)[0]["content"]  # noqa: E731
    assert content("What?", 1) == [{"type": "image"}, {"type": "text", "text": "What?"}]  # no placeholder
    assert content("<image>\nWhat?", 1) == [{"type": "image"}, {"type": "text", "text": "What?"}]
    assert content("<image> and <image>", 1) == [{"type": "image"}, {"type": "text", "text": "and"}]
    assert content("<image>What?", 2) == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What?"}]
    assert content("Hi", 0) == [{"type": "text", "text": "Hi"}]
    video = lambda q, n, v: build_prompt(q, n, v)[0]["content"]  # noqa: E731
    assert video("<image>and<video>?", 1, 1) == [{"type": "image"}, {"type": "text", "text": "and"},
                                                  {"type": "video"}, {"type": "text", "text": "?"}]
    assert video("<video><image>", 1, 0) == [{"type": "image"}]  # a placeholder without its visual: dropped
    assert video("What?", 1, 1) == [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What?"}]


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path, caplog):
    imgs = tmp_path / "imgs"
    write_png(imgs / "ok.png")
    (imgs / "garbage.png").write_bytes(b"this is not an image at all")
    (imgs / "empty.jpg").write_bytes(b"")
    good = write_png(imgs / "trunc.png", size=(64, 64), noise=True).read_bytes()
    (imgs / "trunc.png").write_bytes(good[: len(good) // 2])  # valid header, truncated data
    rows = [
        row("ok.png"),
        '{"image": "ok.png", "conversations": [',  # invalid JSON
        row("ok.png", answer=""),  # empty answer
        {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Q?"}]},  # no gpt turn
        {"image": "ok.png"},  # no conversations
        row("missing.png"),
        row(["ok.png", "missing2.png"]),
        row("garbage.png"),
        row("empty.jpg"),
        row("trunc.png"),
        row(42),  # image of the wrong type
        "[1, 2]",  # not an object
        row(["ok.png", "ok.png"], question="<image><image>Same?", answer="yes", id="last"),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vlgrpo.rollout.data"):
        ds = load_datasets([DataSource(path, imgs)])
    assert [ds[i].sample_id for i in range(len(ds))] == ["d:1", "last"]
    assert ds.skipped == {
        "invalid_json": 1, "no_answer": 2, "no_question": 1, "missing_image": 2,
        "unreadable_image": 3, "bad_row": 2,
    }
    assert ds.num_skipped == 11
    assert any("skipped 11" in r.message and "d.jsonl" in r.message for r in caplog.records)


def test_image_that_fails_when_drawn_is_counted_and_skipped(tmp_path):
    """Images are decoded at load time (a truncated file is caught there) and again each time a
    sample is built: one that fails then (broken on disk since loading) is counted once,
    remembered, and never reaches a batch."""
    imgs = tmp_path / "imgs"
    write_png(imgs / "ok.png")
    good = write_png(imgs / "later.png", size=(64, 64), noise=True).read_bytes()
    (imgs / "trunc.png").write_bytes(good[: len(good) // 2])
    path = write_jsonl(tmp_path / "d.jsonl", [row("ok.png", id="ok"), row("later.png", id="t"), row("trunc.png")])
    ds = load_datasets(DataSource(path, imgs))
    assert len(ds) == 2 and ds.skipped == {"unreadable_image": 1}  # truncated: caught by the load-time decode
    assert ds.get(1).images[0].size == (64, 64)
    (imgs / "later.png").write_bytes(good[: len(good) // 2])  # broken after loading
    sampler = PromptSampler(ds, batch_size=3, seed=0)
    batch = next(sampler)
    assert [s.sample_id for s in batch] == ["ok"] * 3  # the broken row is dropped when drawn
    assert ds.skipped == {"unreadable_image": 2}
    assert ds.get(1) is None and ds.skipped == {"unreadable_image": 2}  # remembered: counted once
    # many batches bigger than the dataset: the good row keeps coming, never "nothing loads any more"
    assert all([s.sample_id for s in next(sampler)] == ["ok"] * 3 for _ in range(20))
    (imgs / "ok.png").write_bytes(b"broken too")
    with pytest.raises(RuntimeError, match="no row of the dataset can be loaded"):
        next(sampler)


def test_file_without_usable_rows_is_an_error_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [row("missing.png"), "not json"])
    with pytest.raises(ValueError, match="all_bad.jsonl") as ei:
        load_datasets([DataSource(path, tmp_path)])
    assert "missing_image" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_datasets([DataSource(tmp_path / "nope.jsonl")])


# ------------------------------------------------------------------------------------ sampler


@pytest.fixture
def text_ds(tmp_path):
    rows = [row(None, question=f"q{i}", answer=str(i), id=f"r{i}") for i in range(10)]
    return load_datasets(DataSource(write_jsonl(tmp_path / "t.jsonl", rows)))


def ids(batch) -> list[str]:
    return [s.sample_id for s in batch]


def test_sampler_is_deterministic_and_reshuffles_each_epoch(text_ds):
    a = [ids(next(PromptSampler(text_ds, 4, seed=1))) for _ in range(2)]
    assert a[0] == a[1]  # same seed, same first batch
    s1, s2 = PromptSampler(text_ds, 5, seed=1), PromptSampler(text_ds, 5, seed=2)
    e1 = ids(next(s1)) + ids(next(s1))
    assert sorted(e1) == sorted(f"r{i}" for i in range(10))  # an epoch covers every row once
    assert e1 != ids(next(s2)) + ids(next(s2))
    e2 = ids(next(s1)) + ids(next(s1))
    assert sorted(e2) == sorted(e1) and e2 != e1 and s1.epoch == 1


def test_sampler_batches_span_epochs(text_ds):
    s = PromptSampler(text_ds, 4, seed=0)
    seen = [ids(next(s)) for _ in range(5)]  # 20 draws = exactly 2 epochs
    flat = sum(seen, [])
    assert all(len(b) == 4 for b in seen)
    assert sorted(flat[:10]) == sorted(flat[10:]) == sorted(f"r{i}" for i in range(10))


def test_sampler_resume_is_exact(text_ds):
    s = PromptSampler(text_ds, 3, seed=5)
    for _ in range(3):
        next(s)  # ends mid-epoch 0 (9 of 10)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [ids(next(s)) for _ in range(4)]  # crosses into epochs 1 and 2
    resumed = PromptSampler(text_ds, 3, seed=999)
    resumed.load_state_dict(state)
    assert state["epoch"] == 0 and state["position"] == 9
    assert [ids(next(resumed)) for _ in range(4)] == expected


def test_sampler_yields_fresh_copies(text_ds):
    s = PromptSampler(text_ds, 1, seed=0)
    b = next(s)
    b[0].prompt[0]["content"].clear()
    assert text_ds[int(b[0].solution)].prompt[0]["content"]


# ------------------------------------------------------------------------------------ synthetic


def nonwhite(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image).astype(int)
    return (arr != 255).any(-1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_loads_cleanly(tmp_path, task):
    jsonl = make_dataset(task, 16, tmp_path / task, seed=3, image_size=56)
    assert jsonl == tmp_path / task / "data.jsonl"
    ds = load_datasets([DataSource(jsonl, tmp_path / task)])
    assert len(ds) == 16 and ds.num_skipped == 0
    spec = TASKS[task]
    rs = RewardSet(["accuracy"])
    samples = [ds[i] for i in range(len(ds))]
    kinds = ["image"] * spec.question.count("<image>") + ["video"] * spec.question.count("<video>")
    for s in samples:
        assert [type(v).__name__ for v in s.images] == [{"image": "Image", "video": "Video"}[k] for k in kinds]
        assert all(im.size == (56, 56) for v in s.images for im in (v if isinstance(v, Video) else [v]))
        assert s.accu_reward_method == spec.accu_reward_method
        assert s.meta["options"] == list(spec.options) and s.solution in spec.options
        text = {"type": "text", "text": spec.question.replace("<image>", "").replace("<video>", "")}
        assert s.prompt[0]["content"] == [{"type": k} for k in kinds] + [text]
    rewards, _, _, errors = rs.score([s.solution for s in samples], samples)
    assert rewards.min().item() == 1.0 and errors == {"accuracy": 0}
    assert len({s.solution for s in samples}) > 1  # not a constant answer


def test_synthetic_color_pixels_match_solution(tmp_path):
    ds = load_datasets(DataSource(make_dataset("color", 24, tmp_path, seed=0)))
    for i in range(len(ds)):
        s = ds[i]
        arr = np.asarray(s.images[0]).astype(float)
        mask = nonwhite(s.images[0])
        assert mask.mean() > 0.1  # a visible shape
        mean = arr[mask].mean(0)
        nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c])))
        assert nearest == s.solution


def test_synthetic_count_and_position_pixels(tmp_path):
    count = load_datasets(DataSource(make_dataset("count", 16, tmp_path / "c", seed=1)))
    for i in range(len(count)):
        m = nonwhite(count[i].images[0])
        quadrants = [m[:28, :28], m[:28, 28:], m[28:, :28], m[28:, 28:]]
        assert sum(q.any() for q in quadrants) == int(count[i].solution)
    pos = load_datasets(DataSource(make_dataset("position", 16, tmp_path / "p", seed=1)))
    for i in range(len(pos)):
        m = nonwhite(pos[i].images[0])
        left, right = m[:, :28].any(), m[:, 28:].any()
        assert (left, right) == ((True, False) if pos[i].solution == "left" else (False, True))
    which = load_datasets(DataSource(make_dataset("which", 16, tmp_path / "w", seed=1)))
    for i in range(len(which)):
        reds = [np.linalg.norm(np.asarray(im).astype(float)[nonwhite(im)].mean(0) - COLORS["red"]) < 1
                for im in which[i].images]
        assert reds == ([True, False] if which[i].solution == "first" else [False, True])


def test_synthetic_flash_only_the_frame_order_tells(tmp_path):
    """The shape alternates between two colours over four frames, the same pixels lit in each: both colours
    are in half the frames, so the frames without their order cannot tell which one is last."""
    ds = load_datasets(DataSource(make_dataset("flash", 32, tmp_path, seed=2)))
    for i in range(len(ds)):
        s = ds[i]
        [video] = s.images
        assert isinstance(video, Video) and len(video) == 4 and video.fps == 2.0
        masks = [nonwhite(f) for f in video]
        assert masks[0].mean() > 0.1 and all((m == masks[0]).all() for m in masks)
        colours = [min(COLORS, key=lambda c: np.linalg.norm(np.asarray(f)[m].mean(0) - COLORS[c]))
                   for f, m in zip(video, masks)]
        assert colours[3] == colours[1] == s.solution != colours[0] == colours[2]
    assert len({ds[i].solution for i in range(len(ds))}) == 4


def test_video_rows_file_or_frames(tmp_path):
    """``video``: a file decoded at ``video_fps`` (PyAV), or frame images at the row's ``fps``; bad ones counted."""
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:  # 20 frames at 10 fps: 2 s
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(20):
            a = np.full((48, 64, 3), 255, np.uint8)
            a[10:30, 2 * t:2 * t + 12] = (230, 25, 25)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())
    for k in range(3):
        write_png(tmp_path / f"f{k}.png", color=(80 * k, 0, 0))
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    rows = [row(None, "<video>Where?", video="clip.mp4"), row("f0.png", "<image>and<video>", video=["f0.png", "f1.png",
            "f2.png"], fps=1), row(None, "<video>", video="absent.mp4"), row(None, "<video>", video="bad.mp4"),
            row(None, "<video>", video=["f0.png", "absent.png"]), row(None, "<video>", video=3)]
    ds = load_datasets(DataSource(write_jsonl(tmp_path / "d.jsonl", rows), video_fps=4))
    assert ds.skipped == {"missing_video": 1, "unreadable_video": 1, "missing_image": 1, "bad_row": 1}
    clip, frames = ds[0].images[0], ds[1].images
    assert isinstance(clip, Video) and clip.fps == 4 and len(clip) == 8  # 2 s at 4 fps
    xs = [np.flatnonzero(np.asarray(f)[20, :, 1] < 128)[0] for f in clip]  # the red shape (lossy codec)
    assert xs == sorted(xs) and xs[-1] - xs[0] > 20  # decoded in time order, the shape moving right
    assert clip[0].size == (64, 48) and ds[0].prompt[0]["content"][0] == {"type": "video"}
    assert [type(v).__name__ for v in frames] == ["Image", "Video"] and frames[1].fps == 1.0
    assert [f.getpixel((0, 0)) for f in frames[1]] == [(0, 0, 0), (80, 0, 0), (160, 0, 0)]
    assert frames[1].metadata() == {"fps": 1.0, "duration": 3.0, "total_num_frames": 3, "frames_indices": [0, 1, 2]}


def test_synthetic_is_deterministic(tmp_path):
    a = make_dataset("color", 5, tmp_path / "a", seed=7)
    b = make_dataset("color", 5, tmp_path / "b", seed=7)
    c = make_dataset("color", 5, tmp_path / "c", seed=8)
    assert a.read_text() == b.read_text()
    pngs = lambda d: [p.read_bytes() for p in sorted((d / "images").iterdir())]  # noqa: E731
    assert pngs(a.parent) == pngs(b.parent) != pngs(c.parent)


def test_synthetic_errors(tmp_path):
    with pytest.raises(ValueError, match="known"):
        make_dataset("nope", 1, tmp_path)


def test_question_template_wraps_questions(tmp_path):
    from vlgrpo.rollout.data import DataSource, load_datasets
    from vlgrpo.rollout.synthetic import make_dataset

    path = make_dataset("color", 3, tmp_path / "d")
    tpl = "{question} First output the thinking process in <think> </think> tags."
    plain = load_datasets([DataSource(path)])[0]
    wrapped = load_datasets([DataSource(path, question_template=tpl)])[0]
    text = lambda s: [c["text"] for c in s.prompt[0]["content"] if c["type"] == "text"][0]  # noqa: E731
    assert text(wrapped) == tpl.replace("{question}", text(plain))
    with pytest.raises(ValueError, match="question"):
        DataSource(path, question_template="no placeholder")
