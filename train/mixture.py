"""The pretraining task mixture: token rows of shards -> training sequences of every VideoPoet task.

Each step draws ONE task (by the configured weights and the paper's image/video schedule) and builds the whole batch
with it. All sequences of a task share one layout length, so a batch needs almost no padding (only captions of
different word counts differ), and steps alternate between the length groups of the tasks. A row that lacks a task's
inputs (no caption, no audio track, no structure video) is skipped for that step and counted.

Condition dropout for classifier-free guidance: with probability `condition_dropout` a sequence loses its text, so
the model also learns the unconditional distribution that guidance contrasts. Text-to-video without text is the
unconditional-video task (they share `<task>`); tasks where text is optional simply drop it; text-to-image and
stylization keep theirs (they have no text-free form).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.sequence import TASKS, Task, TaskSequence, build_sequence, central_mask
from pipeline.text import TextCondition, TextConditioner
from pipeline.vocab import Special, Vocabulary

DEFAULT_WEIGHTS = {
    "text_to_video": 4.0, "text_to_image": 1.0, "unconditional": 1.0, "future_prediction": 1.0,
    "image_to_video": 1.0, "inpainting": 0.5, "outpainting": 0.5, "stylization": 1.0, "video_to_audio": 1.0,
    "audio_to_video": 1.0, "audio_video_continuation": 1.0,
}


@dataclass(frozen=True)
class MixtureConfig:
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    # The paper's schedule: mostly images for the first quarter of training, then mostly video.
    image_share_early: float = 0.9
    image_share_late: float = 0.1
    schedule_switch: float = 0.25  # share of the steps after which the late image share applies
    condition_dropout: float = 0.1
    mask_fraction: float = 0.5  # side of the hidden center box for in/outpainting, as a share of the frame
    audio_video_ratio: float = 50 / 8  # audio frames per input video frame (50 Hz codes, 8 fps video)

    def __post_init__(self):
        unknown = sorted(set(self.weights) - {t.value for t in Task})
        if unknown:
            tasks = ", ".join(t.value for t in Task)
            raise ValueError(f"mixture.weights: unknown task {unknown[0]!r} (tasks: {tasks})")
        if any(w < 0 for w in self.weights.values()) or not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"mixture.weights: need non-negative weights with at least one > 0, got {self.weights}")


@dataclass(frozen=True)
class Row:
    """One clip's tokens, as the mixture needs them."""

    video: np.ndarray  # (t, h, w) local codes
    audio: np.ndarray | None  # (levels, frames)
    structure: np.ndarray | None  # (t, h, w)
    caption: str | None


def rows_from_table(columns: Mapping[str, Sequence[Any]]) -> list[Row]:
    """Shard columns (as Python lists or numpy object arrays) -> rows with their token arrays reshaped."""

    def tokens(values, shape, dtype):
        return None if values is None else np.asarray(values, dtype=dtype).reshape([int(s) for s in shape])

    rows = []
    for i in range(len(columns["clip_id"])):
        audio_shape = columns["audio_shape"][i]
        structure = columns.get("structure_tokens")
        rows.append(Row(
            video=tokens(columns["video_tokens"][i], columns["video_shape"][i], np.int64),
            audio=None if audio_shape is None else tokens(columns["audio_tokens"][i], audio_shape, np.int64),
            structure=(None if structure is None or structure[i] is None
                       else tokens(structure[i], columns["structure_shape"][i], np.int64)),
            caption=columns["caption"][i] or None))
    return rows


# where each input of a task comes from, for errors that say how to provide it
INPUT_SOURCES = {"caption": "a `caption` column in the manifest",
                 "audio": "`videopoet tokenize --audio-tokenizer` on sources with sound",
                 "structure": "`videopoet tokenize --structure`"}


def needs(task: Task) -> tuple[str, ...]:
    """The inputs a row must have to serve `task`: of "caption", "audio", "structure"."""
    spec = TASKS[task]
    found = []
    if spec.text == "required":
        found.append("caption")
    if spec.audio_in != "none" or spec.audio_out != "none":
        found.append("audio")
    if spec.video_in == "structure":
        found.append("structure")
    return tuple(found)


def check_inputs(cfg: MixtureConfig, available: set[str], where: str) -> None:
    """Refuse, before training starts, a mixture that draws a task whose inputs no row of the data has."""
    for name, weight in cfg.weights.items():
        missing = [need for need in needs(Task(name)) if need not in available]
        if weight > 0 and missing:
            raise ValueError(f"mixture.weights.{name} = {weight:g}, but no row of {where} has its "
                             f"{' and '.join(missing)} (provided by {'; '.join(INPUT_SOURCES[m] for m in missing)}): "
                             f"set --set mixture.weights.{name}=0 or re-tokenize")


class Mixture:
    def __init__(self, cfg: MixtureConfig, vocab: Vocabulary, text: TextConditioner, steps: int):
        """`text` turns captions into word tokens or embeddings; `steps` (the run's length) sets the schedule."""
        self.cfg = cfg
        self.vocab = vocab
        self.text = text
        self.steps = steps
        self.tasks = [Task(name) for name, w in cfg.weights.items() if w > 0]

    def task_probabilities(self, step: int) -> dict[Task, float]:
        image_share = (self.cfg.image_share_early if step < self.cfg.schedule_switch * self.steps
                       else self.cfg.image_share_late)
        weights = {t: self.cfg.weights[t.value] for t in self.tasks}
        image = {t: w for t, w in weights.items() if t == Task.TEXT_TO_IMAGE}
        video = {t: w for t, w in weights.items() if t != Task.TEXT_TO_IMAGE}
        if not image or not video:  # one kind only: the schedule has nothing to balance
            total = sum(weights.values())
            return {t: w / total for t, w in weights.items()}
        probs = {t: image_share * w / sum(image.values()) for t, w in image.items()}
        probs.update({t: (1 - image_share) * w / sum(video.values()) for t, w in video.items()})
        return probs

    def task_for_step(self, step: int, seed: int) -> Task:
        probs = self.task_probabilities(step)
        tasks = list(probs)
        choice = np.random.default_rng([seed, step, 7]).choice(len(tasks), p=np.array([probs[t] for t in tasks]))
        return tasks[int(choice)]

    def lacks(self, task: Task, row: Row) -> str | None:
        """Why `row` cannot serve `task` (e.g. "caption"), or None."""
        has = {"caption": bool(row.caption), "audio": row.audio is not None, "structure": row.structure is not None}
        return next((need for need in needs(task) if not has[need]), None)

    def build(self, task: Task, row: Row, rng: np.random.Generator) -> tuple[TaskSequence, TextCondition]:
        spec = TASKS[task]
        kwargs: dict[str, Any] = {}
        condition = TextCondition()
        if spec.text != "none" and row.caption:
            dropped = rng.random() < self.cfg.condition_dropout
            if dropped and task == Task.TEXT_TO_VIDEO:
                task, spec = Task.UNCONDITIONAL, TASKS[Task.UNCONDITIONAL]
            elif not (dropped and spec.text == "optional"):
                (condition,) = self.text.condition([row.caption])
                kwargs.update(condition.sequence_kwargs())
        if spec.audio_in != "none" or spec.audio_out != "none":
            kwargs["audio"] = row.audio
        t = row.video.shape[0]
        if spec.video_in == "context":
            kwargs["context_frames"] = int(rng.integers(1, t)) if task == Task.FUTURE_PREDICTION else 1
            if spec.audio_in == "context":
                kwargs["context_audio_frames"] = self.context_audio_frames(kwargs["context_frames"], row)
        if spec.video_in == "masked":
            mask = central_mask(row.video.shape, self.cfg.mask_fraction)
            kwargs["mask"] = mask if task == Task.INPAINTING else ~mask
        if spec.video_in == "structure":
            kwargs["structure"] = row.structure
        video = row.video[:1] if spec.video_out == "image" else row.video  # an image is the clip's first frame
        return build_sequence(task, self.vocab, video, **kwargs), condition

    def context_audio_frames(self, context_latent_frames: int, row: Row) -> int:
        """Audio frames covering the input frames behind `k` causal latent frames: 1 + 4 (k - 1) of them."""
        frames_in = 1 + 4 * (context_latent_frames - 1)
        return min(row.audio.shape[1] - 1, max(1, round(frames_in * self.cfg.audio_video_ratio)))

    def batch(self, rows: Sequence[Row], step: int, seed: int, rank: int, size: int, skipped: dict[str, int]
              ) -> tuple[Task, list[TaskSequence], list[TextCondition]]:
        """`size` sequences of this step's task from `rows`, drawn deterministically by (seed, step, rank)."""
        task = self.task_for_step(step, seed)
        usable = []
        for i, row in enumerate(rows):
            reason = self.lacks(task, row)
            if reason is None:
                usable.append(i)
            else:
                key = f"{task.value}.no_{reason}"
                skipped[key] = skipped.get(key, 0) + 1
        if not usable:
            lacking = ", ".join(sorted(k for k in skipped if k.startswith(task.value)))
            raise ValueError(f"mixture: no row has the inputs of {task.value} (rows lack: {lacking}); set its weight "
                             "to 0")
        rng = np.random.default_rng([seed, step, rank, 1])
        picks = rng.choice(usable, size=size, replace=len(usable) < size)
        built = [self.build(task, rows[i], rng) for i in picks]
        return task, [b[0] for b in built], [b[1] for b in built]


def collate(sequences: Sequence[TaskSequence], pad_id: int = int(Special.PAD)) -> dict[str, np.ndarray]:
    """Right-pad a batch: ids, prefix lengths, loss mask (0 on padding), and the padding share."""
    length = max(len(s.ids) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, np.int64)
    loss_mask = np.zeros((len(sequences), length), np.float32)
    for i, s in enumerate(sequences):
        ids[i, : len(s.ids)] = s.ids
        loss_mask[i, : len(s.ids)] = s.loss_mask
    lengths = np.array([len(s.ids) for s in sequences])
    return {"ids": ids, "prefix_len": np.array([s.prefix_length for s in sequences], np.int64),
            "loss_mask": loss_mask, "lengths": lengths, "padding": 1 - lengths.sum() / ids.size}
