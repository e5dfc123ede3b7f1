"""Task sequences: the token layout of every pretraining task, built from tokenizer-local codes and parsed back.

The layout (paper Fig. 2); a modality that a task does not use drops its codes and its delimiters:

    <bos> <task> [<bot_i> text <eot_i>] [<bov_i> video <eov_i>] [<boa_i> audio <eoa_i>] <source> <res>
    [<bov_o> video <eov_o>] [<boa_o> audio <eoa_o>] <eos>

The prefix runs up to and including the first output's begin token (`<bov_o>`, or `<boa_o>` for video-to-audio): it
gets bidirectional attention and no loss, so the model has read every condition and the declared output before it
predicts the first output code. Everything after it (codes, end tokens, a second output's begin token, `<eos>`) is
output: causal attention and loss mask 1.

Video runs frame by frame, each latent frame in raster order; audio a whole RVQ level at a time, coarse to fine. Text
is either word tokens in the vocabulary's text range, or `<text_embedding>` placeholders right after `<bot_i>` whose
embeddings the model replaces with projected text-encoder outputs (at most 64, as the paper's T5-XL).

Text-to-image leaves off `<eov_o>` and `<eos>` and shares `<task>` with text-to-video, so a text-to-image sequence is
a prefix of the text-to-video sequence of any clip that starts with that image: a generated image continues into a
video. A `Layout` (task, latent grid, audio frames, text length) fixes every position and its valid id range; the
builder writes along it, the parser checks against it, and a sampler masks logits with `Layout.valid_ranges()`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from enum import Enum
from typing import Literal

import numpy as np
from einops import rearrange

from pipeline.vocab import (
    NUM_RESOLUTIONS,
    NUM_SOURCES,
    RESOLUTION_BASE,
    SOURCE_BASE,
    Special,
    TaskToken,
    Vocabulary,
    resolution_token,
    source_token,
)

MAX_TEXT_EMBEDDINGS = 64

_DELIMITERS = (Special.BOS, Special.EOS, Special.BOT_I, Special.EOT_I, Special.BOV_I, Special.EOV_I, Special.BOA_I,
               Special.EOA_I, Special.BOV_O, Special.EOV_O, Special.BOA_O, Special.EOA_O)


class Task(str, Enum):
    UNCONDITIONAL = "unconditional"
    TEXT_TO_VIDEO = "text_to_video"
    TEXT_TO_IMAGE = "text_to_image"
    FUTURE_PREDICTION = "future_prediction"
    IMAGE_TO_VIDEO = "image_to_video"
    INPAINTING = "inpainting"
    OUTPAINTING = "outpainting"
    STYLIZATION = "stylization"
    VIDEO_TO_AUDIO = "video_to_audio"
    AUDIO_TO_VIDEO = "audio_to_video"
    AUDIO_VIDEO_CONTINUATION = "audio_video_continuation"


class SequenceError(ValueError):
    """A task sequence that cannot be built or parsed; the message starts with the task."""

    @classmethod
    def of(cls, task: Task, problem: str) -> SequenceError:
        return cls(f"{task.value}: {problem}")


class ModalityError(SequenceError):
    """A modality the task needs is missing, or one it does not use was given."""


class ShapeError(SequenceError):
    """A latent shape, length or frame count that does not fit the task."""


class MalformedSequenceError(SequenceError):
    """Ids that do not follow the task's layout: missing, repeated or misplaced tokens, wrong lengths."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task conditions on and what it outputs.

    Visual input: `image` the first latent frame; `context` the first k latent frames; `masked` the clip with hidden
    positions replaced by `<mask>`; `structure` a flow/depth video from the same tokenizer; `clip` the whole clip.
    Outputs: `clip` the whole clip; `rest` what follows the context; `image` a one-frame clip left open.
    """

    token: TaskToken
    text: Literal["none", "optional", "required"]
    video_in: Literal["none", "image", "context", "masked", "structure", "clip"] = "none"
    audio_in: Literal["none", "context", "clip"] = "none"
    video_out: Literal["none", "clip", "rest", "image"] = "clip"
    audio_out: Literal["none", "clip", "rest"] = "none"

    @property
    def uses_audio(self) -> bool:
        return self.audio_in != "none" or self.audio_out != "none"


TASKS: dict[Task, TaskSpec] = {
    Task.UNCONDITIONAL: TaskSpec(TaskToken.VIDEO, "none"),
    Task.TEXT_TO_VIDEO: TaskSpec(TaskToken.VIDEO, "required"),
    Task.TEXT_TO_IMAGE: TaskSpec(TaskToken.VIDEO, "required", video_out="image"),
    Task.FUTURE_PREDICTION: TaskSpec(TaskToken.CONTINUATION, "optional", video_in="context", video_out="rest"),
    Task.IMAGE_TO_VIDEO: TaskSpec(TaskToken.VIDEO, "optional", video_in="image"),
    Task.INPAINTING: TaskSpec(TaskToken.INPAINT, "optional", video_in="masked"),
    Task.OUTPAINTING: TaskSpec(TaskToken.OUTPAINT, "optional", video_in="masked"),
    Task.STYLIZATION: TaskSpec(TaskToken.STYLIZE, "required", video_in="structure"),
    Task.VIDEO_TO_AUDIO: TaskSpec(TaskToken.AUDIO, "optional", video_in="clip", video_out="none", audio_out="clip"),
    Task.AUDIO_TO_VIDEO: TaskSpec(TaskToken.VIDEO, "optional", audio_in="clip"),
    Task.AUDIO_VIDEO_CONTINUATION: TaskSpec(TaskToken.CONTINUATION, "optional", video_in="context",
                                            audio_in="context", video_out="rest", audio_out="rest"),
}

# Inputs that are a slice of the clip itself (the rest is a derived copy: an image, a masked copy, a structure video).
_CLIP_INPUTS = ("context", "clip")


def central_mask(shape: tuple[int, int, int], fraction: float = 0.5) -> np.ndarray:
    """True inside a centred box spanning `fraction` of the height and width of every latent frame.

    It is the hidden region of central inpainting; its complement is that of central outpainting.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"central_mask: fraction must be in (0, 1), got {fraction}")
    t, h, w = shape
    box_h, box_w = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - box_h) // 2, (w - box_w) // 2
    mask = np.zeros((t, h, w), dtype=bool)
    mask[:, top:top + box_h, left:left + box_w] = True
    return mask


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of positions sharing one valid id range [low, high); a special token is a run of one."""

    name: str
    field: str | None  # the payload it holds ("text", "input video", "output audio", ...); None for special tokens
    start: int
    stop: int
    low: int
    high: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every position of one task's sequence. Shapes describe the clip; the task derives inputs and outputs from it.

    video: latent grid (t, h, w) of the clip (t = 1 for text-to-image). audio: (levels, frames) of its audio.
    text_tokens / text_embeddings: word tokens, or positions reserved for text-encoder embeddings (never both).
    context_frames / context_audio_frames: the given latent frames / audio frames of future prediction and
    audio-video continuation. source / resolution: indices written as `<source>` and `<res>`.
    """

    task: Task
    vocab: Vocabulary
    video: tuple[int, int, int]
    audio: tuple[int, int] | None = None
    text_tokens: int = 0
    text_embeddings: int = 0
    context_frames: int = 0
    context_audio_frames: int = 0
    source: int = 0
    resolution: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", Task(self.task))
        object.__setattr__(self, "video", tuple(int(n) for n in self.video))
        if self.audio is not None:
            object.__setattr__(self, "audio", tuple(int(n) for n in self.audio))
        self._check_video()
        self._check_audio()
        self._check_text()
        if not 0 <= self.source < NUM_SOURCES:
            raise SequenceError.of(self.task, f"source index {self.source} is outside [0, {NUM_SOURCES})")
        if not 0 <= self.resolution < NUM_RESOLUTIONS:
            raise SequenceError.of(self.task, f"resolution index {self.resolution} is outside [0, {NUM_RESOLUTIONS})")

    def _check_video(self) -> None:
        task, spec, k = self.task, self.spec, self.context_frames
        if len(self.video) != 3 or min(self.video) < 1:
            raise ShapeError.of(task, f"video latent grid must be three positive sizes (t, h, w), got {self.video}")
        t = self.video[0]
        if spec.video_out == "image" and t != 1:
            raise ShapeError.of(task, f"an image is one latent frame, got a latent grid of {t} frames")
        if spec.video_in == "context" and not 1 <= k < t:
            raise ShapeError.of(task, f"context_frames must be in [1, {t}) for a clip of {t} latent frames, got {k}")
        if spec.video_in != "context" and k:
            raise ShapeError.of(task, f"takes no context_frames (got {k}); only future prediction and continuation do")

    def _check_audio(self) -> None:
        task, spec, ka = self.task, self.spec, self.context_audio_frames
        if spec.uses_audio and self.audio is None:
            raise ModalityError.of(task, "needs audio codes (levels, frames)")
        if not spec.uses_audio and self.audio is not None:
            raise ModalityError.of(task, "takes no audio")
        if self.audio is not None:
            if len(self.audio) != 2 or self.audio[0] != self.vocab.audio_levels or self.audio[1] < 1:
                raise ShapeError.of(task, f"audio must be ({self.vocab.audio_levels} levels, frames >= 1), "
                                          f"got {self.audio}")
            frames = self.audio[1]
            if spec.audio_in == "context" and not 1 <= ka < frames:
                raise ShapeError.of(task, f"context_audio_frames must be in [1, {frames}) for {frames} audio frames, "
                                          f"got {ka}")
        if spec.audio_in != "context" and ka:
            raise ShapeError.of(task, f"takes no context_audio_frames (got {ka}); only audio-video continuation does")

    def _check_text(self) -> None:
        task, spec, n, m = self.task, self.spec, self.text_tokens, self.text_embeddings
        if n < 0 or m < 0 or (n and m):
            raise ShapeError.of(task, f"text is either tokens or embedding positions, got {n} tokens and {m} "
                                      "embedding positions")
        if m > MAX_TEXT_EMBEDDINGS:
            raise ShapeError.of(task, f"at most {MAX_TEXT_EMBEDDINGS} text embedding positions, got {m}")
        if n and not self.vocab.text_size:
            raise ModalityError.of(task, "text tokens need a vocabulary with a text range (text_size > 0); "
                                         "pass text embeddings instead")
        if spec.text == "required" and not (n or m):
            raise ModalityError.of(task, "needs text (tokens or embedding positions)")
        if spec.text == "none" and (n or m):
            raise ModalityError.of(task, "takes no text; use text_to_video for a text condition")

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]

    @property
    def input_video_shape(self) -> tuple[int, int, int] | None:
        t, h, w = self.video
        frames = {"none": 0, "image": 1, "context": self.context_frames}.get(self.spec.video_in, t)
        return (frames, h, w) if frames else None

    @property
    def output_video_shape(self) -> tuple[int, int, int] | None:
        t, h, w = self.video
        return None if self.spec.video_out == "none" else (t - self.context_frames, h, w)

    @property
    def input_audio_shape(self) -> tuple[int, int] | None:
        if self.spec.audio_in == "none":
            return None
        levels, frames = self.audio
        return levels, self.context_audio_frames if self.spec.audio_in == "context" else frames

    @property
    def output_audio_shape(self) -> tuple[int, int] | None:
        if self.spec.audio_out == "none":
            return None
        levels, frames = self.audio
        return levels, frames - self.context_audio_frames

    @functools.cached_property
    def segments(self) -> tuple[Segment, ...]:
        vocab, spec = self.vocab, self.spec
        runs: list[tuple[str, str | None, int, int, int]] = []  # name, field, length, low, high

        def token(name: str, token_id: int) -> None:
            runs.append((name, None, 1, int(token_id), int(token_id) + 1))

        def special(token_id: Special) -> None:
            token(token_id.token, token_id)

        def audio(field: str, frames: int) -> None:
            for level in range(vocab.audio_levels):
                runs.append((f"{field} level {level}", field, frames, *vocab.audio_range(level)))

        special(Special.BOS)
        token("<task>", spec.token)
        if self.text_tokens or self.text_embeddings:
            special(Special.BOT_I)
            if self.text_embeddings:
                placeholder = int(Special.TEXT_EMBEDDING)
                runs.append(("text", "text", self.text_embeddings, placeholder, placeholder + 1))
            else:
                runs.append(("text", "text", self.text_tokens, *vocab.text_range))
            special(Special.EOT_I)
        if shape := self.input_video_shape:
            low = Special.MASK if spec.video_in == "masked" else vocab.video_offset
            special(Special.BOV_I)
            runs.append(("input video", "input video", math.prod(shape), int(low), vocab.audio_offset))
            special(Special.EOV_I)
        if shape := self.input_audio_shape:
            special(Special.BOA_I)
            audio("input audio", shape[1])
            special(Special.EOA_I)
        token("<source>", source_token(self.source))
        token("<res>", resolution_token(self.resolution))
        if shape := self.output_video_shape:
            special(Special.BOV_O)
            runs.append(("output video", "output video", math.prod(shape), *vocab.video_range))
            if spec.video_out != "image":
                special(Special.EOV_O)
        if shape := self.output_audio_shape:
            special(Special.BOA_O)
            audio("output audio", shape[1])
            special(Special.EOA_O)
        if spec.video_out != "image":
            special(Special.EOS)

        stops = np.cumsum([length for _, _, length, _, _ in runs]).tolist()
        return tuple(Segment(name, field, stop - length, stop, low, high)
                     for (name, field, length, low, high), stop in zip(runs, stops))

    @property
    def length(self) -> int:
        return self.segments[-1].stop

    @property
    def prefix_length(self) -> int:
        return next(s.stop for s in self.segments if s.name in (Special.BOV_O.token, Special.BOA_O.token))

    def span(self, field: str) -> slice:
        """The positions of one payload ("text", "input video", "input audio", "output video", "output audio")."""
        members = [s for s in self.segments if s.field == field]
        if not members:
            raise SequenceError.of(self.task, f"this layout has no {field}")
        return slice(members[0].start, members[-1].stop)

    def segment_at(self, position: int) -> Segment:
        starts = [s.start for s in self.segments]
        return self.segments[int(np.searchsorted(starts, position, side="right")) - 1]

    @functools.cached_property
    def _ranges(self) -> tuple[np.ndarray, np.ndarray]:
        lengths = [s.stop - s.start for s in self.segments]
        low = np.repeat(np.array([s.low for s in self.segments], dtype=np.int64), lengths)
        high = np.repeat(np.array([s.high for s in self.segments], dtype=np.int64), lengths)
        low.flags.writeable = high.flags.writeable = False
        return low, high

    def valid_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """Per position, the valid ids [low, high): a sampler masks logits outside them (read-only arrays)."""
        return self._ranges

    def loss_mask(self) -> np.ndarray:
        return np.arange(self.length) >= self.prefix_length

    def text_embedding_positions(self) -> np.ndarray:
        if not self.text_embeddings:
            return np.zeros(0, dtype=np.int64)
        return np.arange(self.length, dtype=np.int64)[self.span("text")]

    @classmethod
    def from_ids(cls, task: Task | str, vocab: Vocabulary, ids: np.ndarray, frame: tuple[int, int]) -> Layout:
        """The layout a sequence claims, read off its delimiters; `frame` is the latent (h, w), which ids cannot tell.

        Only the structure is read here: `parse_sequence` then checks every id against the layout.
        """
        task = Task(task)
        spec = TASKS[task]
        ids = _as_ids(task, ids)
        if len(frame) != 2 or min(frame) < 1:
            raise ShapeError.of(task, f"frame must be the latent (h, w) of one frame, got {tuple(frame)}")
        found = {token: np.flatnonzero(ids == token) for token in _DELIMITERS}
        for token, hits in found.items():
            if hits.size > 1:
                positions = hits[:4].tolist()
                raise MalformedSequenceError.of(task, f"{token.token} appears {hits.size} times, at {positions}")
        at = {token: int(hits[0]) for token, hits in found.items() if hits.size}

        def count(begin: Special, end: Special | None) -> int:
            stop = at.get(end) if end is not None else len(ids)
            if begin not in at or stop is None or stop <= at[begin]:
                closing = f" ... {end.token}" if end is not None else ""
                raise MalformedSequenceError.of(task, f"expected {begin.token}{closing} in the sequence")
            return stop - at[begin] - 1

        def whole(n: int, unit: int, what: str) -> int:
            if n % unit:
                raise MalformedSequenceError.of(task, f"{what} holds {n} ids, not a whole number of {unit}-id units")
            return n // unit

        frame_size, levels = math.prod(frame), vocab.audio_levels
        text = count(Special.BOT_I, Special.EOT_I) if Special.BOT_I in at else 0
        embedded = bool(text) and ids[at[Special.BOT_I] + 1] == Special.TEXT_EMBEDDING
        video_in = video_out = audio_in = audio_out = 0
        if spec.video_in != "none":
            video_in = whole(count(Special.BOV_I, Special.EOV_I), frame_size, "the input video")
        if spec.video_out != "none":
            end = None if spec.video_out == "image" else Special.EOV_O
            video_out = whole(count(Special.BOV_O, end), frame_size, "the output video")
        if spec.audio_in != "none":
            audio_in = whole(count(Special.BOA_I, Special.EOA_I), levels, "the input audio")
        if spec.audio_out != "none":
            audio_out = whole(count(Special.BOA_O, Special.EOA_O), levels, "the output audio")
        first_output = at[Special.BOV_O] if spec.video_out != "none" else at[Special.BOA_O]
        if first_output < 2:
            raise MalformedSequenceError.of(task, f"expected <source> <res> before position {first_output}")
        source, resolution = int(ids[first_output - 2]), int(ids[first_output - 1])
        if not (SOURCE_BASE <= source < SOURCE_BASE + NUM_SOURCES
                and RESOLUTION_BASE <= resolution < RESOLUTION_BASE + NUM_RESOLUTIONS):
            raise MalformedSequenceError.of(task, f"expected <source> <res> before position {first_output}, found "
                                                  f"{vocab.describe(source)} {vocab.describe(resolution)}")
        try:
            return cls(
                task, vocab,
                video=((video_in if spec.video_in in _CLIP_INPUTS else 0) + video_out, *frame),
                audio=(levels, audio_in + audio_out) if spec.uses_audio else None,
                text_tokens=0 if embedded else text,
                text_embeddings=text if embedded else 0,
                context_frames=video_in if spec.video_in == "context" else 0,
                context_audio_frames=audio_in if spec.audio_in == "context" else 0,
                source=source - SOURCE_BASE,
                resolution=resolution - RESOLUTION_BASE,
            )
        except SequenceError as e:
            raise MalformedSequenceError(f"{e} (layout read from the sequence)") from None


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSequence:
    """One training sequence. loss_mask marks output tokens (targets); positions < prefix_length attend both ways."""

    ids: np.ndarray
    prefix_length: int
    loss_mask: np.ndarray
    text_embedding_positions: np.ndarray
    layout: Layout


@dataclasses.dataclass(frozen=True, eq=False)
class ParsedSequence:
    """A sequence read back as tokenizer-local codes, with the arguments `build_sequence` took."""

    video: np.ndarray
    audio: np.ndarray | None
    text: np.ndarray | None
    text_embeddings: int
    mask: np.ndarray | None
    structure: np.ndarray | None


def _as_codes(task: Task, name: str, value: np.ndarray | None, ndim: int) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim != ndim or 0 in value.shape:
        raise ShapeError.of(task, f"{name} must be a non-empty {ndim}-d array, got shape {value.shape}")
    return value


def _expect(task: Task, name: str, value: np.ndarray | None, shape: tuple[int, ...] | None) -> np.ndarray | None:
    if shape is None:
        if value is not None:
            raise ModalityError.of(task, f"takes no {name}")
        return None
    if value is None:
        raise ModalityError.of(task, f"needs {name} of shape {shape}")
    value = np.asarray(value)
    if value.shape != shape:
        raise ShapeError.of(task, f"{name} has shape {value.shape}, expected {shape}")
    return value


def _as_ids(task: Task, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise MalformedSequenceError.of(task, f"expected a 1-d integer id array, got shape {ids.shape} {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _conditions(layout: Layout, text: np.ndarray | None, video: np.ndarray | None, audio: np.ndarray | None,
                mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """Prefix payloads from unified ids whose presence and shapes have been checked against the layout."""
    task = layout.task
    payloads = {}
    if text is not None:
        payloads["text"] = text
    if video is not None:
        payloads["input video"] = rearrange(video, "t h w -> (t h w)")
    if layout.spec.video_in == "masked":
        mask = _expect(task, "mask (True where hidden)", mask, layout.video)
        if mask.dtype != np.bool_:
            raise ShapeError.of(task, f"mask must be boolean (True where hidden), got dtype {mask.dtype}")
        if not mask.any():
            raise ShapeError.of(task, "mask hides nothing")
        payloads["input video"] = np.where(rearrange(mask, "t h w -> (t h w)"), Special.MASK, payloads["input video"])
    elif mask is not None:
        raise ModalityError.of(task, "takes no mask; only inpainting and outpainting do")
    if audio is not None:
        payloads["input audio"] = rearrange(audio, "level frame -> (level frame)")
    return payloads


def _assemble(layout: Layout, payloads: dict[str, np.ndarray], stop: int) -> np.ndarray:
    """Special tokens and placeholders come from the ranges (a run of one id); payloads fill their spans."""
    ids = layout.valid_ranges()[0][:stop].copy()
    for field, values in payloads.items():
        ids[layout.span(field)] = values
    return ids


def build_prompt(layout: Layout, *, text: np.ndarray | None = None, video: np.ndarray | None = None,
                 audio: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """The prefix ids of `layout` (length `layout.prefix_length`): what a sampler continues.

    video is the visual condition as the task takes it: the image (1, h, w) for image-to-video, the first k latent
    frames for future prediction and continuation, the clip to mask (with `mask`) for painting, the structure video
    for stylization, the clip for video-to-audio. audio is the clip's audio for audio-to-video, its first frames for
    continuation. text is tokens when the layout has text tokens; embedding positions need no input.
    """
    vocab, task = layout.vocab, layout.task
    text = _expect(task, "text tokens", text, (layout.text_tokens,) if layout.text_tokens else None)
    video = _expect(task, "a video condition", video, layout.input_video_shape)
    audio = _expect(task, "an audio condition", audio, layout.input_audio_shape)
    payloads = _conditions(
        layout,
        None if text is None else vocab.text_to_unified(text, f"{task.value}: text"),
        None if video is None else vocab.video_to_unified(video, f"{task.value}: video condition"),
        None if audio is None else vocab.audio_to_unified(audio, f"{task.value}: audio condition"),
        mask,
    )
    return _assemble(layout, payloads, layout.prefix_length)


def build_sequence(task: Task | str, vocab: Vocabulary, video: np.ndarray, *, audio: np.ndarray | None = None,
                   text: np.ndarray | None = None, text_embeddings: int = 0, mask: np.ndarray | None = None,
                   structure: np.ndarray | None = None, context_frames: int = 0, context_audio_frames: int = 0,
                   source: int = 0, resolution: int = 0) -> TaskSequence:
    """The training sequence of `task` for one clip, from tokenizer-local codes.

    video (t, h, w) and audio (levels, frames) are the clip's codes; text its word tokens, or text_embeddings the
    number of positions reserved for text-encoder embeddings. mask (t, h, w), True where hidden, is for inpainting and
    outpainting; structure (t, h, w) the flow/depth codes for stylization; context_frames (k latent frames) for future
    prediction and continuation, context_audio_frames for continuation (the audio of those frames).
    """
    task = Task(task)
    video = _as_codes(task, "video", video, 3)
    if video is None:
        raise ModalityError.of(task, "needs video codes (t, h, w)")
    audio = _as_codes(task, "audio", audio, 2)
    text = _as_codes(task, "text", text, 1)
    layout = Layout(task, vocab, video.shape, None if audio is None else audio.shape,
                    text_tokens=0 if text is None else len(text), text_embeddings=text_embeddings,
                    context_frames=context_frames, context_audio_frames=context_audio_frames, source=source,
                    resolution=resolution)
    spec, name = layout.spec, task.value
    structure = _expect(task, "structure video", structure, layout.video if spec.video_in == "structure" else None)
    video_ids = vocab.video_to_unified(video, f"{name}: video")
    audio_ids = None if audio is None else vocab.audio_to_unified(audio, f"{name}: audio")
    visual = None
    if spec.video_in == "structure":
        visual = vocab.video_to_unified(structure, f"{name}: structure video")
    elif layout.input_video_shape:
        visual = video_ids[:layout.input_video_shape[0]]
    payloads = _conditions(
        layout,
        None if text is None else vocab.text_to_unified(text, f"{name}: text"),
        visual,
        audio_ids[:, :layout.input_audio_shape[1]] if layout.input_audio_shape else None,
        mask,
    )
    if layout.output_video_shape:
        payloads["output video"] = rearrange(video_ids[context_frames:], "t h w -> (t h w)")
    if layout.output_audio_shape:
        payloads["output audio"] = rearrange(audio_ids[:, context_audio_frames:], "level frame -> (level frame)")
    return TaskSequence(
        ids=_assemble(layout, payloads, layout.length),
        prefix_length=layout.prefix_length,
        loss_mask=layout.loss_mask(),
        text_embedding_positions=layout.text_embedding_positions(),
        layout=layout,
    )


def parse_sequence(ids: np.ndarray, layout: Layout) -> ParsedSequence:
    """Read a (generated) sequence back into tokenizer-local codes, checking every id against `layout`.

    The clip is rebuilt from its slices: a context and the rest are joined, so future prediction and continuation
    return the whole clip. The mask of painting and the structure video of stylization come from the prefix.
    """
    task, vocab, spec = layout.task, layout.vocab, layout.spec
    ids = _as_ids(task, ids)
    if len(ids) != layout.length:
        raise MalformedSequenceError.of(task, f"expected {layout.length} ids for this layout, got {len(ids)}")
    low, high = layout.valid_ranges()
    bad = np.flatnonzero((ids < low) | (ids >= high))
    if bad.size:
        i = int(bad[0])
        segment = layout.segment_at(i)
        expected = (vocab.describe(segment.low) if segment.high - segment.low == 1
                    else f"an id in [{segment.low}, {segment.high})")
        raise MalformedSequenceError.of(task, f"position {i} ({segment.name}): expected {expected}, found "
                                              f"{vocab.describe(ids[i])} ({bad.size} misplaced ids in all)")

    def video(field: str, shape: tuple[int, int, int]) -> np.ndarray:
        t, h, w = shape
        return rearrange(ids[layout.span(field)], "(t h w) -> t h w", t=t, h=h, w=w)

    def audio(field: str, shape: tuple[int, int]) -> np.ndarray:
        return vocab.audio_to_local(rearrange(ids[layout.span(field)], "(level frame) -> level frame", level=shape[0]))

    video_in = video("input video", layout.input_video_shape) if layout.input_video_shape else None
    clip_video = [vocab.video_to_local(video_in)] if spec.video_in in _CLIP_INPUTS else []
    if layout.output_video_shape:
        clip_video.append(vocab.video_to_local(video("output video", layout.output_video_shape)))
    clip_audio = [audio("input audio", layout.input_audio_shape)] if spec.audio_in in _CLIP_INPUTS else []
    if layout.output_audio_shape:
        clip_audio.append(audio("output audio", layout.output_audio_shape))
    return ParsedSequence(
        video=np.concatenate(clip_video, axis=0),
        audio=np.concatenate(clip_audio, axis=1) if clip_audio else None,
        text=vocab.text_to_local(ids[layout.span("text")]) if layout.text_tokens else None,
        text_embeddings=layout.text_embeddings,
        mask=video_in == Special.MASK if spec.video_in == "masked" else None,
        structure=vocab.video_to_local(video_in) if spec.video_in == "structure" else None,
    )
