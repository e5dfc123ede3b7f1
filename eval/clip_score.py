"""CLIP similarity between videos and their captions (the paper's CLIPSIM on MSR-VTT, with CLIP ViT-B/16).

Per video: the cosine between each frame's CLIP image embedding and the caption's text embedding, averaged over
the frames; over the set: the mean over videos. Two conventions, each under its own name:

- `clip_similarity`: the raw cosine, as the paper reports it (0.3049 pretrained, 0.3123 adapted).
- `clip_score`: 100 * max(cosine, 0) per frame (each frame is an image-caption pair), averaged: the CLIPScore
  convention of torchmetrics.

Preprocessing follows the model's own preprocess config (open_clip's `preprocess_cfg`: image size, mean/std,
interpolation, resize mode): the shorter side resized to the image size and a center crop ('shortest', the mode of
every OpenAI/LAION CLIP) or a resize to the exact size ('squash'); then [0, 1] and the mean/std normalization. It is
open_clip's evaluation transform run by torchvision on batches of uint8 tensors instead of PIL images one by one:
both resample with antialiasing and round to uint8, so they differ by resampling rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
from einops import rearrange
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def check_videos(videos: np.ndarray | Tensor) -> Tensor:
    videos = torch.as_tensor(videos)
    if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3 or 0 in videos.shape[:2]:
        raise ValueError(f"videos: expected uint8 (B, T, H, W, 3) with B, T >= 1, got {videos.dtype} "
                         f"{tuple(videos.shape)}")
    return videos


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-16"  # an open_clip model name, or "local-dir:/path" (open_clip_config.json + weights)
    weights: Optional[str] = None  # local checkpoint (.pt, .bin, .safetensors); not used with local-dir:
    batch_size: int = 64  # frames per forward pass


class ClipEncoder:
    """A frozen open_clip model: unit-norm embeddings of video frames and of texts."""

    def __init__(self, config: ClipConfig, device: str | torch.device = "cpu"):
        local_dir = config.model.startswith("local-dir:")
        if not local_dir and not (config.weights and Path(config.weights).is_file()):
            raise FileNotFoundError(f"ClipConfig.weights: CLIP {config.model} needs a local weights file, got "
                                    f"{config.weights!r} (nothing is downloaded)")
        self.config = config
        self.device = torch.device(device)
        self.model = open_clip.create_model(config.model, pretrained=None if local_dir else config.weights,
                                            device=self.device, require_pretrained=True).eval()
        self.tokenizer = open_clip.get_tokenizer(config.model)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = pp.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash") or (self.resize_mode == "shortest"
                                                               and self.size[0] != self.size[1]):
            raise ValueError(f"CLIP {config.model}: preprocessing resize_mode {self.resize_mode!r} at size "
                             f"{self.size} is not supported (square 'shortest' or 'squash')")
        self.interpolation = InterpolationMode(pp.get("interpolation", "bicubic"))
        self.mean, self.std = list(pp["mean"]), list(pp["std"])

    def preprocess(self, frames: Tensor) -> Tensor:
        """uint8 (N, H, W, 3) -> normalized float (N, 3, *image size)."""
        x = rearrange(frames, "n h w c -> n c h w")
        if self.resize_mode == "shortest":
            x = TF.center_crop(TF.resize(x, [self.size[0]], self.interpolation, antialias=True), list(self.size))
        else:
            x = TF.resize(x, list(self.size), self.interpolation, antialias=True)
        return TF.normalize(x.float() / 255, self.mean, self.std)

    @torch.inference_mode()
    def encode_frames(self, videos: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, T, H, W, 3) -> unit-norm frame embeddings (B, T, D), float32 on the CPU."""
        videos = check_videos(videos)
        frames = rearrange(videos, "b t h w c -> (b t) h w c")
        step = self.config.batch_size
        embeddings = [self.model.encode_image(self.preprocess(frames[i:i + step].to(self.device)), normalize=True)
                      for i in range(0, len(frames), step)]
        return rearrange(torch.cat(embeddings).float().cpu(), "(b t) d -> b t d", b=len(videos))

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> unit-norm embeddings (N, D), float32 on the CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()


@dataclass(frozen=True)
class ClipSimilarity:
    """Per-video scores; the set's scores are their means (`summary`)."""

    clip_similarity: np.ndarray  # (B,) mean over frames of the frame-caption cosine (the paper's CLIPSIM)
    clip_score: np.ndarray  # (B,) mean over frames of 100 * max(cosine, 0) (CLIPScore)

    @classmethod
    def from_cosines(cls, cosines: np.ndarray) -> ClipSimilarity:
        """Frame-caption cosines (B, T) -> both conventions per video."""
        return cls(cosines.mean(axis=1), (100 * np.clip(cosines, 0, None)).mean(axis=1))

    @classmethod
    def concat(cls, parts: list[ClipSimilarity]) -> ClipSimilarity:
        return cls(np.concatenate([p.clip_similarity for p in parts]), np.concatenate([p.clip_score for p in parts]))

    def summary(self) -> dict[str, float]:
        return {"clip_similarity": float(self.clip_similarity.mean()), "clip_score": float(self.clip_score.mean()),
                "videos": len(self.clip_similarity)}


class ClipScorer:
    """Videos uint8 (B, T, H, W, 3) and one caption each -> `ClipSimilarity`."""

    def __init__(self, config: ClipConfig, device: str | torch.device = "cpu"):
        self.encoder = ClipEncoder(config, device)

    def frame_cosines(self, videos: np.ndarray | Tensor, captions: list[str]) -> np.ndarray:
        """The cosine between every frame and its video's caption, (B, T) float64."""
        videos = check_videos(videos)
        if len(captions) != len(videos):
            raise ValueError(f"captions: expected one per video ({len(videos)}), got {len(captions)}")
        empty = [i for i, c in enumerate(captions) if not c.strip()]
        if empty:
            raise ValueError(f"captions: empty caption at index {empty[0]} ({len(empty)} empty in all)")
        frames = self.encoder.encode_frames(videos)
        texts = self.encoder.encode_text(captions)
        return torch.einsum("btd,bd->bt", frames, texts).double().numpy()

    def __call__(self, videos: np.ndarray | Tensor, captions: list[str]) -> ClipSimilarity:
        return ClipSimilarity.from_cosines(self.frame_cosines(videos, captions))
