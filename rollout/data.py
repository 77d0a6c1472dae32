"""VLM-R1 JSONL datasets, read as-is (images, several per prompt, and videos), bad rows skipped and counted, and a
deterministic resumable prompt sampler. Row format and rules: docs/design.md#datasets."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image
from transformers.video_utils import load_video as decode_video

from ..modules.base import Video
from .rewards import ACCURACY_METHODS
from .types import Sample

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


class BadRow(Exception):
    """A row that cannot become a Sample; ``reason`` is the key counted in ``dataset.skipped``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class DataSource:
    """One JSONL file. ``image_folder`` defaults to the file's directory; ``accu_reward_method`` is the default
    for rows that set none; ``question_template`` wraps each question, like VLM-R1's ``QUESTION_TEMPLATE``
    (``"{question} First output the thinking process in <think> </think> tags and then ..."``)."""

    path: PathLike
    image_folder: Optional[PathLike] = None
    accu_reward_method: Optional[str] = None
    question_template: str = "{question}"
    video_fps: float = 2.0

    def __post_init__(self) -> None:
        if "{question}" not in self.question_template:
            raise ValueError(f"question_template {self.question_template!r} must contain '{{question}}'")


@dataclass
class DataConfig:
    """The ``data`` section of the run config."""

    # VLM-R1 JSONL files: [{path, image_folder, accu_reward_method, question_template}]; empty = synthetic task
    sources: list = field(default_factory=list)
    val_sources: list = field(default_factory=list)  # validation files, same format (trainer.val_every); empty: none
    question_template: str = "{question}"  # default for sources without their own, e.g. VLM-R1's think/answer prompt
    synthetic_task: str = "color"
    synthetic_size: int = 512
    video_fps: float = 2.0  # frames a second taken from video files; the fps of frame lists without their own

    def data_sources(self, synthetic_path: Optional[PathLike] = None) -> list[DataSource]:
        """The sources to load: the configured files, else the synthetic task written at ``synthetic_path``."""
        given = self.sources or [{"path": synthetic_path}]
        return [DataSource(**{"question_template": self.question_template, "video_fps": self.video_fps, **s})
                for s in given]


def build_prompt(question: str, num_images: int, num_videos: int = 0) -> list[dict[str, Any]]:
    """A one-turn user conversation: an image (video) item per ``<image>`` (``<video>``) placeholder, text in
    between; visuals beyond the placeholders are put first, placeholders beyond the visuals are dropped."""
    pieces, left = re.split(r"<(image|video)>", question), {"image": num_images, "video": num_videos}
    content: list[dict[str, Any]] = []
    for kind in left:  # visuals without a placeholder
        first = max(0, left[kind] - pieces[1::2].count(kind))
        content += [{"type": kind} for _ in range(first)]
        left[kind] -= first
    for i, piece in enumerate(pieces):
        if i % 2 and left[piece] > 0:  # a placeholder, while visuals of its kind are left
            content.append({"type": piece})
            left[piece] -= 1
        elif not i % 2 and piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]


def _question_and_answer(row: dict[str, Any]) -> tuple[str, str]:
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise BadRow("no_question", "no 'conversations' list")
    turns = [t for t in conv if isinstance(t, dict)]
    q_idx = next((i for i, t in enumerate(turns) if t.get("from") in ("human", "user")), None)
    if q_idx is None or not isinstance(turns[q_idx].get("value"), str):
        raise BadRow("no_question", "no human turn")
    answer = next((t.get("value") for t in turns[q_idx + 1:] if t.get("from") in ("gpt", "assistant")), None)
    if not isinstance(answer, str) or not answer.strip():
        raise BadRow("no_answer", "no gpt answer")
    return turns[q_idx]["value"], answer.strip()


def _image_names(row: dict[str, Any]) -> list[str]:
    image = row.get("image")
    if image is None or isinstance(image, str):
        return [image] if image else []
    if isinstance(image, list) and all(isinstance(x, str) and x for x in image):
        return list(image)
    raise BadRow("bad_row", f"'image' must be a string or a list of strings, got {image!r}")


def _video_names(row: dict[str, Any]) -> Union[None, str, list[str]]:
    video = row.get("video")
    if video is None or (isinstance(video, str) and video) or (
            isinstance(video, list) and video and all(isinstance(x, str) and x for x in video)):
        return video
    raise BadRow("bad_row", f"'video' must be a file name or a list of frame file names, got {video!r}")


def load_video(video: Union[str, list[str]], fps: float) -> Video:
    """A video file decoded at ``fps`` frames a second, or frame images; raises BadRow like ``load_image``."""
    if isinstance(video, list):
        return Video([load_image(Path(p)) for p in video], fps)
    if not Path(video).is_file():
        raise BadRow("missing_video", f"no file {video}")
    try:
        frames, _ = decode_video(video, fps=fps, backend="pyav")
    except Exception as e:  # noqa: BLE001 - PyAV raises its own kinds
        raise BadRow("unreadable_video", f"{video}: {type(e).__name__}: {e}") from e
    return Video([Image.fromarray(f) for f in frames], fps)


def load_image(path: Path) -> Image.Image:
    """Decode an image as RGB; raises BadRow ``missing_image`` / ``unreadable_image``."""
    if not path.is_file():
        raise BadRow("missing_image", f"no file {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, ...)
        raise BadRow("unreadable_image", f"{path}: {type(e).__name__}: {e}") from e


def parse_row(line: str, source: DataSource, image_folder: Path, line_no: int) -> Sample:
    """Validate one JSONL line and turn it into a record: its Sample without the images, which
    are decoded here once and again from ``meta["image_paths"]`` for each draw (raises BadRow)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow("invalid_json", str(e)) from e
    if not isinstance(row, dict):
        raise BadRow("bad_row", f"row is a {type(row).__name__}, not an object")
    question, answer = _question_and_answer(row)
    question = source.question_template.replace("{question}", question)
    paths = [image_folder / name for name in _image_names(row)]
    sizes = [load_image(p).size for p in paths]
    meta: dict[str, Any] = {"source": str(source.path), "line": line_no, "image_paths": [str(p) for p in paths]}
    video = _video_names(row)
    if video is not None:
        video = str(image_folder / video) if isinstance(video, str) else [str(image_folder / v) for v in video]
        meta.update(video=video, video_fps=float(row.get("fps") or source.video_fps))
        load_video(video, meta["video_fps"])
    if sizes:
        meta["image_size"] = sizes[0]
    options = row.get("options")
    if options is not None:
        if not isinstance(options, list):
            raise BadRow("bad_row", f"'options' must be a list, got {options!r}")
        meta["options"] = [str(o) for o in options]
    method = str(row.get("accu_reward_method") or source.accu_reward_method or "default")
    if method not in ACCURACY_METHODS:  # a data error for the whole run: stop here, not score 0 in training
        raise ValueError(f"{source.path}:{line_no}: unknown accu_reward_method {method!r}; known: "
                         f"{', '.join(sorted(ACCURACY_METHODS))}")
    sample_id = str(row["id"]) if row.get("id") is not None else f"{Path(source.path).stem}:{line_no}"
    return Sample(sample_id, build_prompt(question, len(paths), int(video is not None)), [], answer, method, meta)


class PromptDataset:
    """Validated records of one or more JSONL files; ``ds[i]`` builds a Sample (images decoded).
    ``skipped``: reason -> number of rows dropped (at load time, plus images that failed to decode when drawn)."""

    def __init__(self, records: list[Sample], skipped: Counter):
        self.records = records
        self.skipped: dict[str, int] = dict(skipped)
        self._bad: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        images = [load_image(Path(p)) for p in rec.meta["image_paths"]]
        if "video" in rec.meta:
            images.append(load_video(rec.meta["video"], rec.meta["video_fps"]))
        prompt = json.loads(json.dumps(rec.prompt))  # callers may mutate their copy
        return Sample(rec.sample_id, prompt, images, rec.solution, rec.accu_reward_method, dict(rec.meta))

    def get(self, i: int) -> Optional[Sample]:
        """``self[i]``, or None (counted in ``skipped``, remembered) if its images fail to load."""
        if i in self._bad:
            return None
        try:
            return self[i]
        except BadRow as e:
            self._bad.add(i)
            self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
            logger.warning("skipping row %s (%s)", self.records[i].sample_id, e)
            return None


def _read_source(source: DataSource) -> tuple[list[Sample], Counter]:
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    folder = Path(source.image_folder) if source.image_folder is not None else path.parent
    records: list[Sample] = []
    skipped: Counter = Counter()
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_row(line, source, folder, line_no))
            except BadRow as e:
                skipped[e.reason] += 1
                if sum(skipped.values()) <= 5:  # warnings per file
                    logger.warning("%s:%d: skipping row (%s)", path, line_no, e)
    if skipped:
        logger.warning("%s: %d usable rows, skipped %d: %s", path, len(records), sum(skipped.values()), dict(skipped))
    if not records:
        raise ValueError(f"no usable rows in {path} (image folder {folder}); skipped: {dict(skipped) or 'empty file'}")
    return records, skipped


def load_datasets(sources: Union[DataSource, Sequence[DataSource]]) -> PromptDataset:
    """Load and validate JSONL files into one dataset (rows in file order, files in given order). Raises
    FileNotFoundError for a missing file, ValueError for a file without any usable row (bad rows: skipped, counted)."""
    if isinstance(sources, DataSource):
        sources = [sources]
    if not sources:
        raise ValueError("load_datasets needs at least one DataSource")
    read = [_read_source(src) for src in sources]
    return PromptDataset([r for records, _ in read for r in records], sum((skip for _, skip in read), Counter()))


class PromptSampler:
    """Endless, seeded batches of Samples: each epoch a fresh permutation (of ``seed`` and the epoch number), a
    batch running on into the next epoch rather than coming out short. ``state_dict()`` / ``load_state_dict()``
    resume exactly (epoch, position). Rows whose images fail to decode when drawn are skipped (and counted)."""

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("PromptSampler needs a non-empty dataset")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __iter__(self) -> Iterator[list[Sample]]:
        return self

    def __next__(self) -> list[Sample]:
        batch: list[Sample] = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):  # next epoch
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            sample = self.dataset.get(int(self._order[self.position]))
            self.position += 1
            if sample is None:  # counted and never drawn again; every epoch still has the good rows
                if len(self.dataset._bad) == len(self.dataset):
                    raise RuntimeError("no row of the dataset can be loaded any more (all images failed)")
                continue
            batch.append(sample)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``'s epoch and position (its seed too, when present)."""
        if state.get("num_rows", len(self.dataset)) != len(self.dataset):
            logger.warning("sampler state was saved for %d rows, dataset has %d: resume is not exact",
                           state["num_rows"], len(self.dataset))
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
