"""Synthetic visual tasks for tiny randomly initialised VLMs, written as VLM-R1 JSONL + PNG images: ``color`` (one
shape of one of four colours; answer the colour word), ``count`` (1-4 shapes; the digit, ``numeric``), ``position``
(one shape in the left or right half; ``left`` / ``right``) and ``which`` (two images, one red shape among them:
``first`` / ``second``; several images per prompt) and ``flash`` (a video of four frames: a shape alternating
between two colours; the last frame's colour word, which only the frames' order tells). Answers are scored by exact
match (``all_match``, or ``numeric`` for counts): no partial credit. Each row carries its answer ``options``
(``Sample.meta["options"]``); questions and options are short and fixed, so that a tiny tokenizer holds each option
word as one token.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from PIL import Image, ImageDraw

from ..modules.base import Video

COLORS: dict[str, tuple[int, int, int]] = {"red": (230, 25, 25), "green": (30, 170, 40), "blue": (30, 60, 230),
                                           "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)

Box = tuple[int, int, int, int]
Generator = Callable[[random.Random, int], tuple[list[Image.Image], str]]


@dataclass(frozen=True)
class TaskSpec:
    """A synthetic task: its fixed question (one ``<image>`` per image), answer options, accuracy
    method and image generator (``generate(rng, image_size) -> (images, answer)``)."""

    name: str
    question: str
    options: tuple[str, ...]
    accu_reward_method: str
    generate: Generator


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, color: tuple[int, int, int]) -> None:
    """Fill ``shape`` inside ``box`` = (x0, y0, x1, y1), inclusive pixel coordinates."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _random_box(rng: random.Random, region: Box, min_frac: float, max_frac: float) -> Box:
    """A square box of side ``min_frac..max_frac`` of the region's smaller side, inside the region."""
    rx0, ry0, rx1, ry1 = region
    side = max(2, int(min(rx1 - rx0, ry1 - ry0) * rng.uniform(min_frac, max_frac)))
    x0, y0 = rng.randint(rx0, rx1 - side), rng.randint(ry0, ry1 - side)
    return x0, y0, x0 + side - 1, y0 + side - 1


def _image(rng: random.Random, size: int, regions: Sequence[Box], max_frac: float = 0.85,
           color: Optional[str] = None) -> Image.Image:
    """A white square image with a random shape in each region, all of ``color`` or each of a random one."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for region in regions:  # rng order: shape, box, colour
        draw_shape(draw, rng.choice(SHAPES), _random_box(rng, region, 0.5, max_frac),
                   COLORS[color or rng.choice(list(COLORS))])
    return image


def _gen_color(rng: random.Random, size: int) -> tuple[list[Image.Image], str]:
    color = rng.choice(list(COLORS))
    return [_image(rng, size, [(0, 0, size, size)], color=color)], color


def _gen_which(rng: random.Random, size: int) -> tuple[list[Image.Image], str]:
    answer, other = rng.choice(["first", "second"]), rng.choice([c for c in COLORS if c != "red"])
    colors = ("red", other) if answer == "first" else (other, "red")
    return [_image(rng, size, [(0, 0, size, size)], color=c) for c in colors], answer


def _gen_count(rng: random.Random, size: int) -> tuple[list[Image.Image], str]:
    half, k = size // 2, rng.randint(1, 4)
    quadrants = [(0, 0, half, half), (half, 0, size, half), (0, half, half, size), (half, half, size, size)]
    return [_image(rng, size, rng.sample(quadrants, k))], str(k)


def _gen_position(rng: random.Random, size: int) -> tuple[list[Image.Image], str]:
    side, half = rng.choice(["left", "right"]), size // 2
    return [_image(rng, size, [(0, 0, half, size) if side == "left" else (half, 0, size, size)], 0.9)], side


def _gen_flash(rng: random.Random, size: int, frames: int = 4) -> tuple[list[Video], str]:
    """One shape flashing between two colours, frame by frame; the answer is the last frame's. Both colours
    fill half the frames, so only their order tells (reversed, a video answers the other colour)."""
    first, last = rng.sample(list(COLORS), 2)
    image = _image(rng, size, [(0, 0, size, size)], color=first)
    mask = Image.eval(image.convert("L"), lambda v: 255 * (v < 250)).convert("1")  # the shape's pixels
    video = Video()
    for k in range(frames):
        video.append(image if k % 2 == frames % 2 else Image.composite(
            Image.new("RGB", image.size, COLORS[last]), image, mask))
    return [video], last


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("color", "<image>What colour is the shape? Answer with one word: red, green, blue or yellow.",
             tuple(COLORS), "all_match", _gen_color),
    TaskSpec("count", "<image>How many shapes are there? Answer with one number: 1, 2, 3 or 4.",
             ("1", "2", "3", "4"), "numeric", _gen_count),
    TaskSpec("position", "<image>Is the shape on the left or on the right? Answer with one word: left or right.",
             ("left", "right"), "all_match", _gen_position),
    TaskSpec("which", "<image><image>Which picture shows a red shape? Answer with one word: first or second.",
             ("first", "second"), "all_match", _gen_which),
    TaskSpec("flash", "<video>The shape flashes. What colour is it in the last frame? Answer with one word: red, "
             "green, blue or yellow.", tuple(COLORS), "all_match", _gen_flash)]}


def make_dataset(task: str = "color", n: int = 1000, out_dir: Union[str, Path] = "synthetic_data", seed: int = 0,
                 image_size: int = 56) -> Path:
    """Write ``n`` rows of ``task`` to ``out_dir/data.jsonl`` (returned) with PNGs under ``out_dir/images`` (paths
    relative to ``out_dir``, the image folder). Deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng, spec, jsonl = random.Random(f"{task}:{seed}"), TASKS[task], out / "data.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for i in range(n):
            images, answer = spec.generate(rng, image_size)
            video = images[0] if isinstance(images[0], Video) else None  # a video task: one video, its frames
            rel = [f"images/{task}_{i:06d}" + (f"_{k}" if k else "") + ".png" for k in range(len(video or images))]
            for image, name in zip(video or images, rel):
                image.save(out / name)
            visual = {"video": rel, "fps": video.fps} if video else {"image": rel[0] if len(rel) == 1 else rel}
            row = {"id": f"{task}-{i:06d}", **visual,
                   "conversations": [{"from": "human", "value": spec.question}, {"from": "gpt", "value": answer}],
                   "accu_reward_method": spec.accu_reward_method, "options": list(spec.options)}
            f.write(json.dumps(row) + "\n")
    return jsonl

