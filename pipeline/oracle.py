"""The oracle of the synthetic world: read a decoded clip back into its attributes, and score batches of reads.

Video: the object is the saturated region on a gray background. A soft mask (a ramp of lightly smoothed chroma,
centred halfway between background and object, so blur moves mass across the edge without changing it) gives per
frame the centroid, the central moments and the mean color. Shape is read from two moments whose direction blur
does not turn: the vertical skewness (a triangle's mass sits towards its base) and how much heavier-tailed the object
is along the diagonals than along the axes (a square's corners; a circle is the same in every direction). Motion is
the fitted centroid velocity; color the hue of the object's mean color. Everything is relative to the frame, so any
resolution and length works.

Audio: the shape's fundamental is the strongest of the candidate pitches, the color is the strongest overtone of that
fundamental, and the motion is the tremolo rate that best fits the loudness envelope.

A read is {"shape": ..., "color": ..., "motion": ...} with None where nothing can be read (no object, no motion,
silence); `read_attributes` reports both modalities so evaluation can measure audio-visual agreement.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from pipeline.synth import ATTRIBUTES, OVERTONE, PALETTE, PITCH_HZ, TREMOLO_HZ

MIN_CONTRAST = 0.15  # object minus background chroma, below which a clip shows no object
MIN_MASS = 0.002  # share of a frame the object must cover to count as present
MIN_TRAVEL = 0.05  # centroid travel over the clip, in frame sides, below which nothing moves
MIN_RMS = 1e-4  # audio quieter than this is silence
MIN_SHAPE_STRENGTH = 0.3  # share of its ideal moments a square or triangle keeps at the least, however blurred
MAX_ELONGATION = math.log(2)  # |log(var x / var y)| beyond which a blob is none of the world's shapes

# (vertical skewness, diagonal minus axis kurtosis, log of horizontal over vertical variance) of the ideal shapes.
# A uniform square projects onto an axis as a uniform density (kurtosis 9/5) and onto a diagonal as a triangular one
# (12/5); a disk is the same in every direction; the equilateral triangle's threefold symmetry makes its second and
# fourth moments isotropic too, and its width grows linearly from apex to base, a vertical density with skewness
# -2 sqrt(2) / 5 (y grows downwards).
SHAPE_MOMENTS: dict[str, tuple[float, float, float]] = {
    "circle": (0.0, 0.0, 0.0),
    "square": (0.0, 0.6, 0.0),
    "triangle": (-2 * math.sqrt(2) / 5, 0.0, 0.0),
}


def _unknown() -> dict[str, str | None]:
    return dict.fromkeys(ATTRIBUTES)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in radians of (..., 3) colors; adding gray leaves it unchanged."""
    r, g, b = np.moveaxis(np.asarray(rgb, dtype=np.float64), -1, 0)
    return np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)


def _nearest(values: Mapping[str, float], value: float, circular: bool = False) -> str:
    def distance(ref: float) -> float:
        d = abs(value - ref)
        return min(d, 2 * math.pi - d) if circular else d

    return min(values, key=lambda name: distance(values[name]))


def _soft_mask(frames: np.ndarray) -> np.ndarray | None:
    """(T, H, W) object weights in [0, 1], or None when no saturated object stands out of the background."""
    rgb = frames.astype(np.float32) / 255
    # A 3x3 mean first: pixel noise averages out, while the object's moments barely change.
    chroma = ndimage.uniform_filter(rgb.max(axis=-1) - rgb.min(axis=-1), size=(1, 3, 3), mode="nearest")
    background, peak = np.percentile(chroma, [50, 99])
    contrast = peak - background
    if contrast < MIN_CONTRAST:
        return None
    # A ramp over the middle of the background-object range: noise below it is dropped, edges keep their area.
    low = background + 0.3 * contrast
    return np.clip((chroma - low) / (0.4 * contrast), 0.0, 1.0)


def _centroids(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) weights -> per-frame centroid x and y, in pixels."""
    mass = weights.sum(axis=(1, 2))
    x, y = np.arange(weights.shape[2], dtype=np.float64), np.arange(weights.shape[1], dtype=np.float64)
    return weights.sum(axis=1) @ x / mass, weights.sum(axis=2) @ y / mass


def shape_moments(weights: np.ndarray) -> np.ndarray:
    """(T, H, W) object weights -> (T, 3): each frame's vertical skewness, its kurtosis along the diagonals minus
    along the axes, and the log of its horizontal over its vertical variance. Frames must hold some weight."""
    mass = weights.sum(axis=(1, 2))
    x, y = np.arange(weights.shape[2], dtype=np.float64), np.arange(weights.shape[1], dtype=np.float64)
    cx, cy = _centroids(weights)
    powers = np.arange(5)
    dx = (x[None, :] - cx[:, None])[..., None] ** powers  # (T, W, 5)
    dy = (y[None, :] - cy[:, None])[..., None] ** powers  # (T, H, 5)
    # Central moments m[t, p, q] = mean of dx^p dy^q under the weights, in two contractions.
    m = np.einsum("thq,thw,twp->tpq", dy, weights, dx, optimize=True) / mass[:, None, None]
    skew = m[:, 0, 3] / m[:, 0, 2] ** 1.5
    axes = (m[:, 4, 0] / m[:, 2, 0] ** 2 + m[:, 0, 4] / m[:, 0, 2] ** 2) / 2

    def diagonal_kurtosis(sign: int) -> np.ndarray:  # along u = (dx + sign * dy) / sqrt(2)
        u2 = (m[:, 2, 0] + 2 * sign * m[:, 1, 1] + m[:, 0, 2]) / 2
        u4 = (m[:, 4, 0] + 4 * sign * m[:, 3, 1] + 6 * m[:, 2, 2] + 4 * sign * m[:, 1, 3] + m[:, 0, 4]) / 4
        return u4 / u2 ** 2

    diagonals = (diagonal_kurtosis(1) + diagonal_kurtosis(-1)) / 2
    return np.stack([skew, diagonals - axes, np.log(m[:, 2, 0] / m[:, 0, 2])], axis=-1)


def _shape_distance(features: np.ndarray, reference: tuple[float, ...]) -> float:
    """Distance to the shape's moments scaled by the best factor in [MIN_SHAPE_STRENGTH, 1]: blur (downscaling, a
    coarse tokenizer) shrinks every shape's moments towards a circle's zeros without turning their direction."""
    ref = np.asarray(reference)
    if not ref.any():
        return float(np.linalg.norm(features))
    scale = np.clip(features @ ref / (ref @ ref), MIN_SHAPE_STRENGTH, 1.0)
    return float(np.linalg.norm(features - scale * ref))


def _check_frames(frames: Any) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"oracle: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 2 or min(frames.shape[1:3]) < 16:
        raise ValueError(f"oracle: frames need at least 2 frames of 16x16 pixels, got {frames.shape}")
    return frames


def read_video_attributes(frames: np.ndarray) -> dict[str, str | None]:
    """Shape, color and motion of the clip's object; None for what cannot be read."""
    frames = _check_frames(frames)
    weights = _soft_mask(frames)
    if weights is None:
        return _unknown()
    _, h, w = weights.shape
    present = weights.sum(axis=(1, 2)) >= MIN_MASS * h * w
    if not present.any():
        return _unknown()
    weights, index = weights[present], np.flatnonzero(present)

    with np.errstate(divide="ignore", invalid="ignore"):  # a blob one pixel thin has no finite moments
        moments = shape_moments(weights)
    moments = moments[np.isfinite(moments).all(axis=1)]
    shape = None
    if len(moments):
        features = np.median(moments, axis=0)
        if abs(features[2]) <= MAX_ELONGATION:  # all three shapes are as wide as they are high
            shape = min(SHAPE_MOMENTS, key=lambda name: _shape_distance(features, SHAPE_MOMENTS[name]))

    rgb = (weights[..., None] * frames[present].astype(np.float64)).sum(axis=(0, 1, 2)) / weights.sum()
    color = _nearest({name: float(_hue(c)) for name, c in PALETTE.items()}, float(_hue(rgb)), circular=True)

    motion = None
    if len(index) >= 2:
        cx, cy = _centroids(weights)
        span = (frames.shape[0] - 1) / min(h, w)  # velocity per frame -> travel over the clip, in frame sides
        vx, vy = np.polyfit(index, cx, 1)[0] * span, np.polyfit(index, cy, 1)[0] * span
        if max(abs(vx), abs(vy)) >= MIN_TRAVEL:
            motion = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    return {"shape": shape, "color": color, "motion": motion}


def _band_energy(power: np.ndarray, freqs: np.ndarray, hz: float) -> float:
    """Spectral energy within a few percent of hz: wide enough for the tremolo's sidebands and a lossy codec."""
    return float(power[np.abs(freqs - hz) <= max(0.04 * hz, 10.0)].sum())


def _envelope(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Loudness sampled every 10 ms, averaged over 40 ms so beats between partials (>= 100 Hz) wash out."""
    hop, window = sample_rate // 100, sample_rate // 25
    energy = np.concatenate([[0.0], np.cumsum(audio ** 2)])
    starts = np.arange(0, len(audio) - window + 1, hop)
    loudness = np.sqrt((energy[starts + window] - energy[starts]) / window)
    return (starts + window / 2) / sample_rate, loudness


def _tremolo_fit(times: np.ndarray, loudness: np.ndarray, hz: float) -> float:
    """Share of the loudness variance that a sinusoid at hz explains."""
    basis = np.stack([np.ones_like(times), np.cos(2 * np.pi * hz * times), np.sin(2 * np.pi * hz * times)], axis=1)
    coef = np.linalg.lstsq(basis, loudness, rcond=None)[0]
    residual = loudness - basis @ coef
    return 1 - float(residual.var() / max(loudness.var(), 1e-20))


def read_audio_attributes(audio: np.ndarray, sample_rate: int) -> dict[str, str | None]:
    """Shape (pitch), color (overtone) and motion (tremolo rate) from a mono clip; None for silence."""
    audio = np.asarray(audio)
    if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"oracle: audio must be mono float samples (N,), got {audio.dtype} {audio.shape}")
    if sample_rate < 8000 or len(audio) < sample_rate // 5:
        raise ValueError(f"oracle: audio needs >= 0.2 s at >= 8 kHz, got {len(audio)} samples at {sample_rate} Hz")
    audio = audio.astype(np.float64)
    if np.sqrt(np.mean(audio ** 2)) < MIN_RMS:
        return _unknown()

    power = np.abs(np.fft.rfft(audio * np.hanning(len(audio)))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / sample_rate)
    shape = max(PITCH_HZ, key=lambda name: _band_energy(power, freqs, PITCH_HZ[name]))
    color = max(OVERTONE, key=lambda name: _band_energy(power, freqs, OVERTONE[name] * PITCH_HZ[shape]))

    times, loudness = _envelope(audio, sample_rate)
    motion = max(TREMOLO_HZ, key=lambda name: _tremolo_fit(times, loudness, TREMOLO_HZ[name]))
    return {"shape": shape, "color": color, "motion": motion}


def read_attributes(frames: np.ndarray, audio: np.ndarray | None, sample_rate: int) -> dict[str, dict[str, str | None]]:
    """{"video": read, "audio": read}; a clip without audio reads as all None there."""
    return {"video": read_video_attributes(frames),
            "audio": _unknown() if audio is None else read_audio_attributes(audio, sample_rate)}


def _shares(hits: np.ndarray) -> dict[str, float]:
    """(clips, attributes) booleans -> the share of hits per attribute and with all attributes at once ("all")."""
    return {**{a: float(hits[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}, "all": float(hits.all(axis=1).mean())}


def _check_batch(reads: Sequence[Any], expected: Sequence[Any]) -> None:
    if len(reads) != len(expected) or not reads:
        raise ValueError(f"oracle: need as many reads as expectations (> 0), got {len(reads)} and {len(expected)}")


def score(reads: Sequence[Mapping[str, str | None]], expected: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Share of reads that match the expected attributes, per attribute and all at once ("all")."""
    _check_batch(reads, expected)
    return _shares(np.array([[read[a] == want[a] for a in ATTRIBUTES] for read, want in zip(reads, expected)]))


def score_av(reads: Sequence[Mapping[str, Mapping[str, str | None]]],
             expected: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Scores of `read_attributes` outputs: "video.<attr>" and "audio.<attr>" against the expectations, and
    "agreement.<attr>", the share of clips whose video and audio reads agree (and are not None)."""
    _check_batch(reads, expected)
    agree = np.array([[r["video"][a] is not None and r["video"][a] == r["audio"][a] for a in ATTRIBUTES]
                      for r in reads])
    return {**{f"video.{k}": v for k, v in score([r["video"] for r in reads], expected).items()},
            **{f"audio.{k}": v for k, v in score([r["audio"] for r in reads], expected).items()},
            **{f"agreement.{k}": v for k, v in _shares(agree).items()}}
