"""The synthetic world's oracle as a fairness `AttributeClassifier`: the shape, color and motion of each clip.

Unlike a zero-shot classifier, the oracle may read nothing (no object stands out, nothing moves, an image has no
motion). Such clips fall in an explicit `unreadable` class. Its reference share is zero, so a model that draws
unreadable clips is far from the reference (TV counts them, KL becomes infinite) instead of silently dropping them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.oracle import read_video_attributes
from pipeline.synth import ATTRIBUTES

UNREADABLE = "unreadable"


class OracleAttributeClassifier:
    """Videos uint8 (T, H, W, 3) -> per attribute the index of the oracle's read among the world's values."""

    def __init__(self):
        self.attributes: dict[str, list[str]] = {name: [*values, UNREADABLE] for name, values in ATTRIBUTES.items()}

    @staticmethod
    def read(video: np.ndarray) -> dict[str, str | None]:
        """The oracle's read of one clip; an image reads as a still clip of two frames (shape and color only)."""
        frames = np.asarray(video)
        if frames.ndim == 4 and len(frames) == 1:
            frames = np.repeat(frames, 2, axis=0)
        return read_video_attributes(frames)

    def labels(self, reads: Sequence[Mapping[str, str | None]]) -> dict[str, np.ndarray]:
        """Reads (None where nothing was read) -> class indices per attribute."""
        out = {}
        for name, classes in self.attributes.items():
            bad = sorted({r[name] for r in reads if r[name] is not None and r[name] not in classes})
            if bad:
                raise ValueError(f"oracle reads: {name} {bad[0]!r} is none of {classes[:-1]}")
            out[name] = np.array([classes.index(r[name] or UNREADABLE) for r in reads], dtype=np.int64)
        return out

    def __call__(self, videos: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return self.labels([self.read(video) for video in videos])

    def references(self) -> dict[str, np.ndarray]:
        """Uniform over the world's values and nothing on `unreadable`: what a balanced prompt set asks for."""
        return {name: np.append(np.full(len(classes) - 1, 1 / (len(classes) - 1)), 0.0)
                for name, classes in self.attributes.items()}
