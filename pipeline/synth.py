"""A synthetic audio-visual world that tiny models can learn and an oracle can check.

Each clip shows one shape of one color on a plain gray background, moving across the frame, with a sound that carries
the same three attributes: the shape sets the pitch, the color sets which overtone sounds with it, the motion sets the
rate of a slow tremolo. Video determines audio and back. The features are chosen to survive 64x64 downscaling, H.264/
AAC and lossy neural tokenizers: saturated, well-separated hues; large shapes; motion across ~a third of the frame;
partials far apart in frequency; tremolo rates of a few hertz. Nuisances (size, start position, travel, background
brightness, loudness) are seeded per clip and kept small. Every phase of the sound is fixed (partials in phase, the
tremolo at full loudness when the clip starts): nothing in the video shows a phase, so a random one makes
video-to-audio ask for codes the video cannot tell, which greedy decoding averages away (measured: the tremolo, i.e.
the motion, read at chance with random phases).

The source frame may be wider than tall (160x128 by default) and faster (24 fps) than the model's clips, so decoding
exercises resampling and the center crop; the object always stays inside the center square.

    videopoet synth --out DIR --clips 96 --seed 0 [--set frames=51 ...]

writes DIR/videos/*.mp4 (H.264 + AAC), DIR/manifest.jsonl (path, caption, id, split, shape, color, motion) and
DIR/synth_config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.config import load_config, to_json
from pipeline.storage import check_folder, save_text

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
MOTIONS = ("left", "right", "up", "down")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "motion": MOTIONS}

# Saturated colors at least a sixth of the hue circle apart; blue is lifted so it stands out of a dark background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.85, 0.12),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.92, 0.90, 0.10),
}
# Unit direction of travel in image coordinates (y grows downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Fundamentals a fifth apart, no one a harmonic of another; overtone orders put the second partial well clear of
# every fundamental; tremolo rates 2 Hz apart stay distinct even over a 5-frame (0.6 s) clip. Every partial is a
# multiple of 50 Hz, the audio tokenizers' frame rate (16 kHz / 320): a 20 ms frame holds whole periods, so a steady
# tone encodes to a steady code, not to one that cycles with the phase drift from frame to frame.
PITCH_HZ: dict[str, float] = {"circle": 200.0, "square": 300.0, "triangle": 450.0}
OVERTONE: dict[str, int] = {"red": 2, "green": 3, "blue": 4, "yellow": 5}
TREMOLO_HZ: dict[str, float] = {"left": 2.0, "right": 4.0, "up": 6.0, "down": 8.0}

# Equal areas (a circle of diameter `size`), so area never gives the shape away: the square's side and the
# equilateral triangle's side per unit of size.
SQUARE_SIDE = math.sqrt(math.pi) / 2
TRIANGLE_SIDE = math.sqrt(math.pi / math.sqrt(3))
# Half width and half height of each shape's bounding box, centred on the object's position, per unit of size.
HALF_EXTENT: dict[str, tuple[float, float]] = {
    "circle": (0.5, 0.5),
    "square": (SQUARE_SIDE / 2, SQUARE_SIDE / 2),
    "triangle": (TRIANGLE_SIDE / 2, TRIANGLE_SIDE * math.sqrt(3) / 4),
}


def caption(attributes: Mapping[str, str]) -> str:
    return f"a {attributes['color']} {attributes['shape']} moving {attributes['motion']}"


def attribute_schedule(seed: int, n: int) -> list[dict[str, str]]:
    """Attributes of clips 0..n-1, balanced for every n.

    shape = i mod 3 and color = i mod 4 walk all 12 pairs in 12 steps (3 and 4 are coprime); motion = i mod 4 steps
    one further every 12 clips, so each pair meets every motion once in 48. Each attribute cycles through its values,
    so in any prefix its counts differ by at most 1, and so do the counts of the 48 combinations. The seed permutes
    the values of each attribute.
    """
    rng = np.random.default_rng(seed)
    shapes, colors, motions = ([values[j] for j in rng.permutation(len(values))] for values in ATTRIBUTES.values())
    pairs = len(SHAPES) * len(COLORS)
    return [{"shape": shapes[i % len(shapes)], "color": colors[i % len(colors)],
             "motion": motions[(i + i // pairs) % len(motions)]} for i in range(n)]


def attribute_key(attributes: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(attributes[a] for a in ATTRIBUTES)


def held_out_combinations(count: int) -> set[tuple[str, ...]]:
    """`count` of the 48 combinations (as `attribute_key`s) to keep out of training, chosen so that every pair of
    values of two attributes still occurs in what is left: a held-out combination is new only as a combination."""
    combos = [attribute_key(c) for c in attribute_schedule(0, len(SHAPES) * len(COLORS) * len(MOTIONS))]
    for seed in range(100):
        held = {combos[i] for i in np.random.default_rng(seed).permutation(len(combos))[:count]}
        seen = [c for c in combos if c not in held]
        pairs = {(i, j, c[i], c[j]) for c in seen for i in range(3) for j in range(i + 1, 3)}
        if all((i, j, c[i], c[j]) in pairs for c in held for i in range(3) for j in range(i + 1, 3)):
            return held
    raise ValueError(f"held_out_combinations: no {count} combinations leave every pair of attribute values in "
                     "training")


@dataclass(frozen=True)
class SynthConfig:
    width: int = 160
    height: int = 128
    fps: int = 24
    frames: int = 51  # 2.125 s at 24 fps: one 17-frame clip at 8 fps
    sample_rate: int = 16000
    # Geometry in units of the center square's side; (low, high) bands are sampled uniformly per clip.
    size: tuple[float, ...] = (0.34, 0.40)  # diameter of the equal-area circle
    travel: tuple[float, ...] = (0.30, 0.38)  # distance covered over the clip
    cross_jitter: float = 0.08  # offset from the center across the direction of travel
    margin: float = 0.02  # kept free between the object and the center square's border
    background: tuple[float, ...] = (0.10, 0.22)  # gray level
    volume: tuple[float, ...] = (0.35, 0.50)  # peak amplitude
    overtone_gain: float = 0.7  # overtone amplitude relative to the fundamental
    tremolo_depth: float = 0.7  # the envelope dips to 1 - depth
    val_fraction: float = 0.1
    # Each geometry (size, path, background, volume) rendered in this many colors, as consecutive clips: clips
    # that differ only in color (and its overtone), so that a structure video, which carries no color, comes with
    # several captions and the caption's color is the only way to tell them apart (stylization's training pairs).
    color_variants: int = 1

    def __post_init__(self):
        if self.width < 32 or self.height < 32:
            raise ValueError(f"SynthConfig: frames must be at least 32x32, got {self.width}x{self.height}")
        if self.frames < 2 or self.fps < 1 or self.sample_rate < 8000:
            raise ValueError(f"SynthConfig: need frames >= 2, fps >= 1 and sample_rate >= 8000, got frames="
                             f"{self.frames} fps={self.fps} sample_rate={self.sample_rate}")
        for name in ("size", "travel", "background", "volume"):
            band = getattr(self, name)
            if len(band) != 2 or not 0 < band[0] <= band[1] <= 1:
                raise ValueError(f"SynthConfig.{name}: expected [low, high] with 0 < low <= high <= 1, got {band}")
        widest = max(max(h) for h in HALF_EXTENT.values()) * self.size[1]
        if self.travel[1] + 2 * (widest + self.margin) > 1 or self.cross_jitter + widest + self.margin > 0.5:
            raise ValueError(f"SynthConfig: objects of size {self.size[1]} travelling {self.travel[1]} (cross jitter "
                             f"{self.cross_jitter}, margin {self.margin}) leave the center square")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"SynthConfig.val_fraction: expected a share in [0, 1), got {self.val_fraction}")
        if not 1 <= self.color_variants <= len(COLORS):
            raise ValueError(f"SynthConfig.color_variants: expected 1 to {len(COLORS)} colors per geometry, got "
                             f"{self.color_variants}")

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def samples(self) -> int:
        return round(self.seconds * self.sample_rate)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that decides one clip's pixels and samples. Geometry in units of the center square's side."""

    id: str
    split: str
    shape: str
    color: str
    motion: str
    size: float
    start: tuple[float, float]  # object position (x, y) in the first frame
    end: tuple[float, float]  # and in the last
    background: float
    volume: float

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "motion": self.motion}

    @property
    def caption(self) -> str:
        return caption(self.attributes)


def plan(cfg: SynthConfig, seed: int, n: int) -> list[ClipSpec]:
    """The specs of clips 0..n-1. Clip i depends only on (seed, i, color_variants), so a larger n extends a corpus.

    With k color variants, clip i is variant i mod k of geometry g = i // k: geometry g takes the attributes of clip g
    of the schedule and the random draws of (seed, g), and variant v shifts its color v places along `COLORS`, so the
    k clips of a geometry differ in color only (and are all train or all val)."""
    if seed < 0 or n < 0:
        raise ValueError(f"synth: seed and clip count must be non-negative, got seed={seed} n={n}")
    k = cfg.color_variants
    schedule = attribute_schedule(seed, -(-n // k))
    specs = []
    for i in range(n):
        g, variant = divmod(i, k)
        attrs = dict(schedule[g], color=COLORS[(COLORS.index(schedule[g]["color"]) + variant) % len(COLORS)])
        rng = np.random.default_rng([seed, g])
        size = rng.uniform(*cfg.size)
        travel = rng.uniform(*cfg.travel)
        dx, dy = DIRECTIONS[attrs["motion"]]
        along = 0 if dx else 1
        # Room for the object's center along the direction of travel, and a start that fits the whole travel in it.
        half = HALF_EXTENT[attrs["shape"]][along] * size + cfg.margin
        first = rng.uniform(half, 1 - half - travel)
        last = first + travel
        if dx + dy < 0:
            first, last = 1 - first, 1 - last
        cross = 0.5 + rng.uniform(-cfg.cross_jitter, cfg.cross_jitter)
        start, end = ((first, cross), (last, cross)) if along == 0 else ((cross, first), (cross, last))
        # Evenly spread validation geometries: g is val when g crosses the next multiple of 1 / val_fraction.
        split = "val" if math.floor((g + 1) * cfg.val_fraction) > math.floor(g * cfg.val_fraction) else "train"
        specs.append(ClipSpec(
            id=f"synth-{seed}-{i:06d}", split=split, **attrs, size=size, start=start, end=end,
            background=rng.uniform(*cfg.background), volume=rng.uniform(*cfg.volume)))
    return specs


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Distance outside the shape's edge (negative inside), for offsets from its position, in the units of size."""
    if shape == "circle":
        return np.hypot(dx, dy) - size / 2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - SQUARE_SIDE / 2 * size
    # Equilateral triangle, apex up: the farthest of its three edge lines. Its centroid sits a sixth of the height
    # below the box center, and its inradius is a third of the height.
    height = TRIANGLE_SIDE * math.sqrt(3) / 2 * size
    dy = dy - height / 6
    sides = math.sqrt(3) / 2 * np.abs(dx) - 0.5 * dy
    return np.maximum(sides, dy) - height / 3


def render_video(spec: ClipSpec, cfg: SynthConfig) -> np.ndarray:
    """uint8 (T, H, W, 3): the object antialiased by its pixel coverage, moving linearly from start to end."""
    side = min(cfg.width, cfg.height)
    t = np.linspace(0.0, 1.0, cfg.frames)
    # Object center per frame, in pixels of the full frame (pixel centers sit at integer + 0.5).
    cx = (cfg.width - side) / 2 + side * (spec.start[0] + (spec.end[0] - spec.start[0]) * t)
    cy = (cfg.height - side) / 2 + side * (spec.start[1] + (spec.end[1] - spec.start[1]) * t)
    dx = np.arange(cfg.width)[None, None, :] + 0.5 - cx[:, None, None]
    dy = np.arange(cfg.height)[None, :, None] + 0.5 - cy[:, None, None]
    coverage = np.clip(0.5 - signed_distance(spec.shape, dx, dy, spec.size * side), 0.0, 1.0)
    color = np.asarray(PALETTE[spec.color], dtype=np.float32)
    frames = spec.background + coverage[..., None].astype(np.float32) * (color - spec.background)
    return np.round(frames * 255).astype(np.uint8)


def render_audio(spec: ClipSpec, cfg: SynthConfig) -> np.ndarray:
    """float32 mono: fundamental + overtone under a tremolo, with 10 ms fades against clicks."""
    t = np.arange(cfg.samples) / cfg.sample_rate
    f0 = PITCH_HZ[spec.shape]
    tone = np.sin(2 * np.pi * f0 * t) + cfg.overtone_gain * np.sin(2 * np.pi * OVERTONE[spec.color] * f0 * t)
    tremolo = 1 - cfg.tremolo_depth * 0.5 * (1 - np.cos(2 * np.pi * TREMOLO_HZ[spec.motion] * t))
    fade = np.clip(np.minimum(t, cfg.seconds - t) / 0.01, 0.0, 1.0)
    return (spec.volume / (1 + cfg.overtone_gain) * tremolo * fade * tone).astype(np.float32)


def write_corpus(out: str | Path, cfg: SynthConfig, n: int, seed: int) -> list[dict]:
    """Render n clips to out/videos/<id>.mp4; write out/manifest.jsonl and out/synth_config.json. Returns the rows."""
    from pipeline.media import write_video

    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in plan(cfg, seed, n):
        path = Path("videos") / f"{spec.id}.mp4"
        write_video(str(out / path), render_video(spec, cfg), cfg.fps, render_audio(spec, cfg), cfg.sample_rate)
        rows.append({"path": path.as_posix(), "caption": spec.caption, "id": spec.id, "split": spec.split,
                     **spec.attributes})
    save_text(out / "manifest.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    save_text(out / "synth_config.json", to_json(cfg) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (videos/, manifest.jsonl, synth_config.json)")
    parser.add_argument("--clips", type=int, default=96, help="number of clips (default 96: each combination twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="a TOML file of SynthConfig fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one SynthConfig field, e.g. --set frames=17")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.seed < 0:
        parser.error(f"--clips must be >= 1 and --seed >= 0, got {args.clips} and {args.seed}")
    try:
        cfg = load_config(SynthConfig, args.config, args.overrides, kind="synth")
        check_folder(args.out)
    except ValueError as e:  # ConfigError (a bad file, key, type or value) or NotAFolder (a file as --out)
        parser.error(str(e))
    began = time.perf_counter()
    rows = write_corpus(args.out, cfg, args.clips, args.seed)
    val = sum(row["split"] == "val" for row in rows)
    print(f"synth: {len(rows)} clips ({len(rows) - val} train, {val} val) of {cfg.width}x{cfg.height} at "
          f"{cfg.fps} fps, {cfg.seconds:.3f} s, seed {args.seed} -> {args.out} in {time.perf_counter() - began:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
