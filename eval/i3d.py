"""Kinetics-400 I3D (Inception-v1 inflated to 3D), the feature extractor of FVD.

The network mirrors piergiaj/pytorch-i3d module for module (Unit3D, MaxPool3dSamePadding, InceptionModule, end
points Conv3d_1a_7x7 .. Mixed_5c, a 1x1x1 `logits` conv to 400 classes), so its `rgb_imagenet.pt` state dict loads
by name. The TorchScript detector that StyleGAN-V ships (`i3d_torchscript.pt`) is wrapped behind the same
`features(x)` interface. Either way, a clip (B, 3, T, 224, 224) in [-1, 1] maps to the 400 logits before the
softmax, averaged over time: the features of the original FVD.

Preprocessing (`I3DConfig`, defaults): the first 16 frames; the shorter side resized to 224 with bilinear
interpolation and no antialiasing (torchvision's Resize), then a center crop, as the StyleGAN-V / fvd-comparison
code does; for the paper's square 256x256 clips this is a plain 256 -> 224 resize. uint8 [0, 255] is scaled to
[-1, 1]. Bicubic and antialiasing are options: state the protocol next to every number.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

NUM_CLASSES = 400
# Five stride-2 stages; the final 7x7 spatial and 2-frame temporal average pool must fit.
MIN_FRAMES, MIN_SIZE = 9, 193


def _pad_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """TensorFlow 'SAME' zero padding of (T, H, W), so the output length is ceil(size / stride), as I3D was trained."""
    pad: list[int] = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        size, k, s = x.shape[2 + axis], kernel[axis], stride[axis]
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class MaxPool3dSamePadding(nn.MaxPool3d):
    def __init__(self, kernel: int | tuple[int, int, int], stride: int | tuple[int, int, int]):
        super().__init__(_triple(kernel), _triple(stride))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_pad_same(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
    """Conv3d (SAME padding) -> BatchNorm (eps 1e-3, as in the TF original) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int, int] = 1,
                 stride: int | tuple[int, int, int] = 1, norm_and_relu: bool = True):
        super().__init__()
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=not norm_and_relu)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if norm_and_relu else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return x


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max-pool -> 1x1."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], 3)
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], 3)
        self.b3a = MaxPool3dSamePadding(3, stride=1)
        self.b3b = Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


def _end_points(in_channels: int) -> list[tuple[str, nn.Module]]:
    """The I3D trunk in order, under pytorch-i3d's names (they are the state dict keys)."""
    mixed = {  # Inception-v1 branch widths
        "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
        "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
        "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
        "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
        "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
        "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
        "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
        "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
        "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
    }
    layers: list[tuple[str, nn.Module]] = [
        ("Conv3d_1a_7x7", Unit3D(in_channels, 64, 7, stride=2)),
        ("MaxPool3d_2a_3x3", MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2))),
        ("Conv3d_2b_1x1", Unit3D(64, 64)),
        ("Conv3d_2c_3x3", Unit3D(64, 192, 3)),
        ("MaxPool3d_3a_3x3", MaxPool3dSamePadding((1, 3, 3), stride=(1, 2, 2))),
    ]
    layers += [(name, InceptionModule(*mixed[name])) for name in ("Mixed_3b", "Mixed_3c")]
    layers.append(("MaxPool3d_4a_3x3", MaxPool3dSamePadding(3, stride=2)))
    layers += [(name, InceptionModule(*mixed[name])) for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                                                                 "Mixed_4f")]
    layers.append(("MaxPool3d_5a_2x2", MaxPool3dSamePadding(2, stride=2)))
    layers += [(name, InceptionModule(*mixed[name])) for name in ("Mixed_5b", "Mixed_5c")]
    return layers


class InceptionI3d(nn.Module):
    """I3D for inference (pytorch-i3d's dropout before the logits is left out: it has no weights)."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3):
        super().__init__()
        self.in_channels = in_channels
        self.trunk: list[str] = []
        for name, module in _end_points(in_channels):
            self.add_module(name, module)
            self.trunk.append(name)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=1)
        self.logits = Unit3D(1024, num_classes, norm_and_relu=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) -> per-time-step logits (B, classes, T'), as pytorch-i3d returns them."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3D input: expected (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t < MIN_FRAMES or min(h, w) < MIN_SIZE:
            raise ValueError(f"I3D input: needs at least {MIN_FRAMES} frames of at least {MIN_SIZE}x{MIN_SIZE} "
                             f"(trained on 224x224), got {t} frames of {h}x{w}")
        for name in self.trunk:
            x = getattr(self, name)(x)
        # Larger inputs leave a spatial grid after the 7x7 pool: average it like the time axis.
        return self.logits(self.avg_pool(x)).mean(dim=(3, 4))

    def features(self, x: Tensor) -> Tensor:
        """Clips (B, C, T, H, W) in [-1, 1] -> the logits averaged over time (B, classes)."""
        return self(x).mean(dim=2)


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript detector behind the `features` interface of `InceptionI3d`."""

    def __init__(self, detector: torch.jit.ScriptModule):
        super().__init__()
        self.detector = detector

    def features(self, x: Tensor) -> Tensor:
        # Inputs are already 224x224 in [-1, 1]; return_features gives the logits before the softmax.
        return self.detector(x, rescale=False, resize=False, return_features=True)


class I3DNetwork(Protocol):
    def features(self, x: Tensor) -> Tensor: ...


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more if keys else "none"


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives carry their code (`<name>/code/...`); torch.save files hold only data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load_torchscript_i3d(path: str | Path, device: str | torch.device = "cpu") -> TorchScriptI3D:
    """StyleGAN-V's `i3d_torchscript.pt`: called as detector(x, rescale=False, resize=False, return_features=True)."""
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this file comes in
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        detector = torch.jit.load(str(path), map_location=device)
    return TorchScriptI3D(detector).eval()


def load_state_dict_i3d(path: str | Path, device: str | torch.device = "cpu") -> InceptionI3d:
    """pytorch-i3d's `rgb_imagenet.pt` (keys like `Mixed_3b.b0.conv3d.weight`) into `InceptionI3d`."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"I3D weights {path}: expected a state dict, got {type(state).__name__}")
    network = InceptionI3d().to(device)
    expected = network.state_dict()
    # Checkpoints from PyTorch < 0.4.1 lack the BatchNorm step counters; inference never reads them.
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise KeyError(f"I3D weights {path} do not match pytorch-i3d's InceptionI3d: missing keys "
                       f"{_preview(missing)}; unexpected keys {_preview(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in state
             if state[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"I3D weights {path}: wrong shapes for {_preview(wrong)}")
    network.load_state_dict(state, strict=False)
    return network.eval()


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> I3DNetwork:
    """Either weights file users have; the format is read from the file, not its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights {path} do not exist (i3d_torchscript.pt or rgb_imagenet.pt)")
    return load_torchscript_i3d(path, device) if is_torchscript(path) else load_state_dict_i3d(path, device)


@dataclass(frozen=True)
class I3DConfig:
    weights: Optional[str] = None  # i3d_torchscript.pt (StyleGAN-V) or rgb_imagenet.pt (pytorch-i3d)
    num_frames: int = 16  # the first frames of each video
    size: int = 224
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    antialias: bool = False
    batch_size: int = 8  # clips per forward pass


class I3DFeatureExtractor:
    """Videos uint8 (B, T, H, W, 3) -> I3D features (B, 400) float64; the network is loaded once."""

    def __init__(self, config: I3DConfig, device: str | torch.device = "cpu"):
        if not config.weights:
            raise ValueError("I3DConfig.weights is not set: FVD needs Kinetics-400 I3D weights "
                             "(i3d_torchscript.pt from StyleGAN-V or rgb_imagenet.pt from pytorch-i3d)")
        if config.num_frames < MIN_FRAMES or config.size < MIN_SIZE:
            raise ValueError(f"I3DConfig: I3D needs num_frames >= {MIN_FRAMES} and size >= {MIN_SIZE}, "
                             f"got {config.num_frames} and {config.size}")
        self.config = config
        self.device = torch.device(device)
        self.network = load_i3d(config.weights, self.device)

    def check(self, videos: np.ndarray | Tensor) -> Tensor:
        videos = torch.as_tensor(videos)
        if videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[-1] != 3 or len(videos) == 0:
            raise ValueError(f"videos: expected uint8 (B, T, H, W, 3) with B >= 1, got {videos.dtype} "
                             f"{tuple(videos.shape)}")
        if videos.shape[1] < self.config.num_frames:
            raise ValueError(f"videos: FVD takes the first {self.config.num_frames} frames, got only "
                             f"{videos.shape[1]}")
        return videos

    def preprocess(self, videos: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, T, H, W, 3) -> float32 (B, 3, num_frames, size, size) in [-1, 1] on the device."""
        videos = self.check(videos)
        b = len(videos)
        n, size = self.config.num_frames, self.config.size
        frames = rearrange(videos[:, :n].to(self.device), "b t h w c -> (b t) c h w").float()
        frames = TF.resize(frames, [size], interpolation=InterpolationMode(self.config.interpolation),
                           antialias=self.config.antialias)
        frames = TF.center_crop(frames, [size, size]).clamp(0, 255) / 127.5 - 1  # bicubic overshoots [0, 255]
        return rearrange(frames, "(b t) c h w -> b c t h w", b=b)

    @torch.inference_mode()
    def __call__(self, videos: np.ndarray | Tensor) -> np.ndarray:
        videos = self.check(videos)
        chunks = [self.network.features(self.preprocess(videos[i:i + self.config.batch_size]))
                  for i in range(0, len(videos), self.config.batch_size)]
        return torch.cat(chunks).double().cpu().numpy()
