"""The structure video for stylization: optical flow and luminance edges stacked into 3 channels.

VideoPoet stylizes from optical flow and depth tokenized by the same video tokenizer: geometry and motion without
appearance, so that the prompt decides the look. Flow is Horn-Schunck (dense, single-scale, in torch); the edges of
the luminance stand in for depth, which needs a model this project cannot ship. Both are computed on luminance
stretched to [0, 1] over the clip, and the edges are scaled by the clip's strongest: a clip recolored (any color,
either polarity against its background) gives the same structure video. Raw luminance, used before, carried the
color, and a model trained on it ignored the prompt's. The tokenize job writes its tokens (`--structure`) and
generation computes it from a conditioning clip.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

KIND = "flow+edges"  # recorded in the shards' settings: tokens of another structure video get another fingerprint
FLOW_RANGE = 0.1  # flow of this fraction of the frame width per frame maps to the ends of the uint8 range
LUMA = (0.299, 0.587, 0.114)
MIN_CONTRAST = 0.05  # luminance ranges (and edge strengths) below this are not stretched further: noise stays small


def _pad(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Replicate the border of (N, H, W) by `before` rows/columns at the top/left and `after` at the bottom/right."""
    return F.pad(x[:, None], (before, after, before, after), mode="replicate")[:, 0]


def _neighbour_mean(x: torch.Tensor) -> torch.Tensor:
    """Horn-Schunck's weighted mean of the 8 neighbours (1/6 edge, 1/12 corner); slices beat a 1-channel conv."""
    p = _pad(x, 1, 1)
    edges = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    corners = p[:, :-2, :-2] + p[:, :-2, 2:] + p[:, 2:, :-2] + p[:, 2:, 2:]
    return edges / 6 + corners / 12


def optical_flow(previous: torch.Tensor, current: torch.Tensor, alpha: float = 0.05, iters: int = 64) -> torch.Tensor:
    """Horn-Schunck flow from `previous` to `current` (N, H, W) intensities in [0, 1] -> (N, 2, H, W) in pixels.

    Derivatives are averaged over the 2x2x2 cube of both frames. Single-scale: motions beyond a couple of pixels per
    frame are underestimated, which is enough for a structure signal but not for measuring motion.
    """
    a, b = _pad(previous, 0, 1), _pad(current, 0, 1)
    both, change = a + b, b - a
    ix = (both[:, :-1, 1:] - both[:, :-1, :-1] + both[:, 1:, 1:] - both[:, 1:, :-1]) / 4
    iy = (both[:, 1:, :-1] - both[:, :-1, :-1] + both[:, 1:, 1:] - both[:, :-1, 1:]) / 4
    it = (change[:, :-1, :-1] + change[:, :-1, 1:] + change[:, 1:, :-1] + change[:, 1:, 1:]) / 4
    denominator = alpha ** 2 + ix ** 2 + iy ** 2
    u = torch.zeros_like(previous)
    v = torch.zeros_like(previous)
    for _ in range(iters):
        u_mean, v_mean = _neighbour_mean(u), _neighbour_mean(v)
        step = (ix * u_mean + iy * v_mean + it) / denominator
        u, v = u_mean - ix * step, v_mean - iy * step
    return torch.stack([u, v], dim=1)


def _edges(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of (N, H, W) by central differences, per pixel unit."""
    p = _pad(x, 1, 1)
    return torch.hypot(p[:, 1:-1, 2:] - p[:, 1:-1, :-2], p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) / 2


def structure_video(frames: np.ndarray) -> np.ndarray:
    """uint8 frames (B, T, H, W, 3) -> the structure video (B, T, H, W, 3): flow x, flow y, edges.

    Flow at frame t is the motion from frame t - 1 (zero at frame 0), scaled so FLOW_RANGE of the frame width per
    frame spans the uint8 range around 128. Edges are 255 at the clip's strongest luminance edge.
    """
    b, t, h, w, _ = frames.shape
    luma = torch.tensor(frames, dtype=torch.float32) @ torch.tensor(LUMA) / 255
    low = luma.amin(dim=(1, 2, 3), keepdim=True)
    luma = (luma - low) / (luma.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(MIN_CONTRAST)
    flow = torch.zeros(b, t, 2, h, w)
    if t > 1:
        pairs = optical_flow(luma[:, :-1].reshape(-1, h, w), luma[:, 1:].reshape(-1, h, w))
        flow[:, 1:] = pairs.reshape(b, t - 1, 2, h, w)
    flow = 128 + 127 * (flow / (FLOW_RANGE * w)).clamp(-1, 1)
    edges = _edges(luma.reshape(-1, h, w)).reshape(b, t, h, w)
    edges = edges / edges.amax(dim=(1, 2, 3), keepdim=True).clamp_min(MIN_CONTRAST)
    video = torch.cat([rearrange(flow, "b t c h w -> b t h w c"), edges[..., None] * 255], dim=-1)
    return video.round().clamp(0, 255).to(torch.uint8).numpy()
