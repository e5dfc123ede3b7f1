"""The structure video of stylization: motion and geometry, not appearance.

A clip of the synthetic world recolored (every color, over every background) gives the same structure video, so a
model conditioned on it must take the color from its prompt; flow points the way the object moves; the edges sit on
the object's outline. Generation refuses stylization with a model trained on another kind of structure video."""

import dataclasses
import re

import numpy as np
import pytest

from pipeline.generation import VideoPoet
from pipeline.media import MediaConfig
from pipeline.sequence import Task
from pipeline.structure import KIND, structure_video
from pipeline.synth import COLORS, SynthConfig, plan, render_video

CFG = SynthConfig(width=48, height=32, fps=8, frames=9)


def spec(motion: str, **changes):
    base = next(s for s in plan(CFG, seed=3, n=48) if s.motion == motion and s.shape == "square")
    return dataclasses.replace(base, **changes)


def structure(*specs) -> np.ndarray:
    return structure_video(np.stack([render_video(s, CFG) for s in specs])).astype(np.int16)


def test_recolored_clips_give_the_same_structure_video():
    clips = [spec("right", color=c, background=b) for c in COLORS for b in (0.10, 0.22)]
    videos = structure(*clips)
    assert videos.shape == (len(clips), CFG.frames, CFG.height, CFG.width, 3)
    # Equal up to the uint8 rounding of the rendered frames: the dimmest pair (blue on the lightest gray) spans
    # 29 gray levels, so its antialiased rims round differently (measured: at most 3 levels on flow, 12 on edges,
    # 0.04 on average; the bars leave room for other CPUs' float rounding).
    change = np.abs(videos - videos[0])
    assert change[..., :2].max() <= 6 and change[..., 2].max() <= 24 and change.mean() < 0.5
    # The raw luminance (the channel this replaced) tells the colors apart: what made the model ignore the prompt.
    luma = np.stack([render_video(s, CFG) for s in clips]).astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    assert np.ptp([frames.max() for frames in luma]) > 100


@pytest.mark.parametrize("motion, channel, sign", [("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)])
def test_flow_points_the_way_the_object_moves(motion, channel, sign):
    video = structure(spec(motion))[0]
    edges = video[1:, ..., 2] > 64  # where the object's outline is, after the first frame (flow 0 there)
    flow = video[1:, ..., :2][edges] - 128
    assert sign * flow[:, channel].mean() > 8 * max(1.0, abs(flow[:, 1 - channel].mean()))
    assert np.all(video[0, ..., :2] == 128)


def grow(mask: np.ndarray) -> np.ndarray:
    """(T, H, W) mask grown by one pixel in the 8 directions."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    return np.any([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def test_edges_lie_on_the_outline_and_a_flat_clip_has_none():
    clip = spec("right", size=0.5)
    edges = structure(clip)[0][..., 2]
    frames = render_video(clip, CFG)
    inside = np.abs(frames.astype(np.int16) - frames[0, 0, 0]).max(axis=-1) > 0  # the object's pixels, rims included
    assert edges.max() == 255
    assert edges[grow(inside) & grow(~inside)].mean() > 100  # within a pixel of the outline
    assert (edges[~grow(inside)] == 0).all()  # the background
    assert edges[~grow(grow(~inside))].max() <= 2  # the interior, two pixels in (central differences span two)
    flat = structure_video(np.full((1, 5, 16, 16, 3), 77, np.uint8))
    assert (flat[..., 2] == 0).all() and (flat[..., :2] == 128).all()


@pytest.mark.parametrize("trained", [False, True, "luminance"])
def test_stylization_refuses_a_model_trained_on_another_structure_video(llm_export, trained):
    media = MediaConfig(height=32, width=32)
    poet = VideoPoet.load(llm_export(["a red square moving right"], media) / "run" / "model")
    assert poet.structure == KIND  # read from the export's shard settings
    poet.structure = trained
    frames = np.zeros((media.clip_frames, media.height, media.width, 3), np.uint8)
    with pytest.raises(ValueError, match=f"stylization: the model was trained .*computes '{re.escape(KIND)}'"):
        poet.generate(Task.STYLIZATION, prompt="a red square moving right", frames=frames)
