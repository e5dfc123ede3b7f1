"""The unified vocabulary: one id space for special tokens, video codes, audio codes and text.

    [0, 256)                         special and task tokens (`Special`, `TaskToken`, `<source>`, `<res>`)
    [256, 256 + V)                   video/image codes (paper: V = 2^18 MAGVIT-v2 LFQ codes)
    then L ranges of A ids           audio codes, one range per RVQ level (paper: L = 4, A = 1,024)
    then T ids                       an optional text vocabulary (0 when text comes as embeddings)

Shards store tokenizer-local codes; the offsets are applied here when sequences are built, so changing a codebook
size moves the ranges without re-tokenizing anything. All converters are vectorized over arrays of any shape.
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum

import numpy as np

NUM_SPECIAL = 256

TASK_BASE, NUM_TASK_TOKENS = 16, 16
SOURCE_BASE, NUM_SOURCES = 32, 64
RESOLUTION_BASE, NUM_RESOLUTIONS = 96, 64


class VocabularyError(ValueError):
    """A vocabulary that cannot be laid out, or a special-token index outside its range."""


class CodeError(ValueError):
    """Codes or ids that are not integers or fall outside their modality's range."""


class Special(IntEnum):
    """Delimiters and placeholders (the paper's special tokens, plus padding and two placeholders)."""

    PAD = 0
    BOS = 1
    EOS = 2
    BOT_I = 3
    EOT_I = 4
    BOV_I = 5
    EOV_I = 6
    BOA_I = 7
    EOA_I = 8
    BOV_O = 9
    EOV_O = 10
    BOA_O = 11
    EOA_O = 12
    # Written where the model substitutes projected text-encoder embeddings for token embeddings.
    TEXT_EMBEDDING = 13
    # COMMIT-style placeholder for a hidden latent position in a conditioning copy. It is the last special id, right
    # below the video range, so a masked copy is still one contiguous id range [MASK, video_end).
    MASK = NUM_SPECIAL - 1

    @property
    def token(self) -> str:
        return f"<{self.name.lower()}>"


class TaskToken(IntEnum):
    """Values of `<task>`: one per kind of output, not per task; the conditions tell the rest.

    A whole clip from whatever conditions are present (unconditional, text-to-video, text-to-image, image-to-video,
    audio-to-video) shares VIDEO; the frames (and audio) after given ones share CONTINUATION (future prediction,
    audio-video continuation).
    """

    VIDEO = TASK_BASE
    CONTINUATION = TASK_BASE + 1
    INPAINT = TASK_BASE + 2
    OUTPAINT = TASK_BASE + 3
    STYLIZE = TASK_BASE + 4
    AUDIO = TASK_BASE + 5

    @property
    def token(self) -> str:
        return f"<task:{self.name.lower()}>"


_TOKEN_NAMES = {int(token): token.token for token in (*Special, *TaskToken)}


def source_token(index: int) -> int:
    """The `<source>` id of a data source (a dataset's index; generation picks the source to imitate)."""
    if not 0 <= index < NUM_SOURCES:
        raise VocabularyError(f"source index {index} is outside [0, {NUM_SOURCES})")
    return SOURCE_BASE + index


def resolution_token(index: int) -> int:
    """The `<res>` id of an output resolution (the caller's index of its spatial latent grid)."""
    if not 0 <= index < NUM_RESOLUTIONS:
        raise VocabularyError(f"resolution index {index} is outside [0, {NUM_RESOLUTIONS})")
    return RESOLUTION_BASE + index


def _check_integers(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise CodeError(f"{what}: expected integer codes, got dtype {values.dtype}")
    return values.astype(np.int64, copy=False)


def _check_within(values: np.ndarray, high: np.ndarray | int, what: str, low: np.ndarray | int = 0) -> None:
    bad = (values < low) | (values >= high)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        lo, hi = np.broadcast_to(low, values.shape)[where], np.broadcast_to(high, values.shape)[where]
        raise CodeError(f"{what}: {int(bad.sum())} of {values.size} values outside their range; "
                        f"first {int(values[where])} at index {where}, expected [{lo}, {hi})")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Range sizes come from the tokenizers' configs: the video codebook, the audio RVQ levels and codebook, text."""

    video_codes: int
    audio_levels: int
    audio_codes: int
    text_size: int = 0

    def __post_init__(self) -> None:
        for name in ("video_codes", "audio_levels", "audio_codes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VocabularyError(f"Vocabulary.{name} must be a positive int, got {value!r}")
        if isinstance(self.text_size, bool) or not isinstance(self.text_size, int) or self.text_size < 0:
            raise VocabularyError(f"Vocabulary.text_size must be a non-negative int, got {self.text_size!r}")

    @classmethod
    def paper(cls, text_size: int = 0) -> Vocabulary:
        """2^18 MAGVIT-v2 codes and 4 SoundStream levels of 1,024 codes: 266,496 ids without text."""
        return cls(video_codes=2**18, audio_levels=4, audio_codes=1024, text_size=text_size)

    @property
    def video_offset(self) -> int:
        return NUM_SPECIAL

    @property
    def audio_offset(self) -> int:
        return self.video_offset + self.video_codes

    @property
    def audio_level_offsets(self) -> np.ndarray:
        """First id of each level's range, coarse (level 0) to fine."""
        return self.audio_offset + self.audio_codes * np.arange(self.audio_levels, dtype=np.int64)

    @property
    def text_offset(self) -> int:
        return self.audio_offset + self.audio_levels * self.audio_codes

    @property
    def size(self) -> int:
        return self.text_offset + self.text_size

    @property
    def video_range(self) -> tuple[int, int]:
        return self.video_offset, self.audio_offset

    def audio_range(self, level: int) -> tuple[int, int]:
        if not 0 <= level < self.audio_levels:
            raise VocabularyError(f"audio level {level} is outside [0, {self.audio_levels})")
        low = self.audio_offset + level * self.audio_codes
        return low, low + self.audio_codes

    @property
    def text_range(self) -> tuple[int, int]:
        return self.text_offset, self.size

    def ranges(self) -> dict[str, tuple[int, int]]:
        """Every range by name, in id order; they tile [0, size) without overlap."""
        ranges = {"special": (0, NUM_SPECIAL), "video": self.video_range}
        ranges |= {f"audio{level}": self.audio_range(level) for level in range(self.audio_levels)}
        if self.text_size:
            ranges["text"] = self.text_range
        return ranges

    def video_to_unified(self, codes: np.ndarray, what: str = "video codes") -> np.ndarray:
        codes = _check_integers(codes, what)
        _check_within(codes, self.video_codes, what)
        return codes + self.video_offset

    def video_to_local(self, ids: np.ndarray, what: str = "video ids") -> np.ndarray:
        ids = _check_integers(ids, what)
        _check_within(ids, self.audio_offset, what, low=self.video_offset)
        return ids - self.video_offset

    def audio_to_unified(self, codes: np.ndarray, what: str = "audio codes") -> np.ndarray:
        """(..., levels, frames) local codes -> ids; level l lands in its own range."""
        codes = self._check_levels(_check_integers(codes, what), what)
        _check_within(codes, self.audio_codes, what)
        return codes + self.audio_level_offsets[:, None]

    def audio_to_local(self, ids: np.ndarray, what: str = "audio ids") -> np.ndarray:
        ids = self._check_levels(_check_integers(ids, what), what)
        low = self.audio_level_offsets[:, None]
        _check_within(ids, low + self.audio_codes, what, low=low)
        return ids - low

    def text_to_unified(self, tokens: np.ndarray, what: str = "text tokens") -> np.ndarray:
        tokens = _check_integers(tokens, what)
        if not self.text_size and tokens.size:
            raise CodeError(f"{what}: this vocabulary has no text range (text_size=0); pass text embeddings instead")
        _check_within(tokens, self.text_size, what)
        return tokens + self.text_offset

    def text_to_local(self, ids: np.ndarray, what: str = "text ids") -> np.ndarray:
        ids = _check_integers(ids, what)
        _check_within(ids, self.size, what, low=self.text_offset)
        return ids - self.text_offset

    def describe(self, token_id: int) -> str:
        """A readable name for one id, for error messages."""
        token_id = int(token_id)
        if token_id in _TOKEN_NAMES:
            return _TOKEN_NAMES[token_id]
        if SOURCE_BASE <= token_id < SOURCE_BASE + NUM_SOURCES:
            return f"<source:{token_id - SOURCE_BASE}>"
        if RESOLUTION_BASE <= token_id < RESOLUTION_BASE + NUM_RESOLUTIONS:
            return f"<res:{token_id - RESOLUTION_BASE}>"
        if 0 <= token_id < NUM_SPECIAL:
            return f"unassigned special id {token_id}"
        if self.video_offset <= token_id < self.audio_offset:
            return f"video code {token_id - self.video_offset} (id {token_id})"
        if self.audio_offset <= token_id < self.text_offset:
            level, code = divmod(token_id - self.audio_offset, self.audio_codes)
            return f"audio level {level} code {code} (id {token_id})"
        if self.text_offset <= token_id < self.size:
            return f"text token {token_id - self.text_offset} (id {token_id})"
        return f"id {token_id} outside the vocabulary [0, {self.size})"

    def _check_levels(self, values: np.ndarray, what: str) -> np.ndarray:
        if values.ndim < 2 or values.shape[-2] != self.audio_levels:
            raise CodeError(f"{what}: expected shape (..., {self.audio_levels} levels, frames), got {values.shape}")
        return values
