"""Optional training signals of the tokenizers: GAN discriminators and a perceptual loss.

They are separate modules that the training app (`train.tokenizers`) builds next to a tokenizer, configured by its
training config (their weights are not part of the tokenizer's checkpoint or fingerprint):

- `VideoDiscriminator`: a 3D convolutional patch discriminator for MAGVIT-v2, hinge loss with LeCam regularization
  (Tseng et al. 2021): the discriminator's outputs on real (fake) data are pulled towards the moving average of its
  outputs on fake (real) data, which keeps it from over-fitting small datasets.
- `STFTDiscriminator`: SoundStream's discriminator on the complex STFT (real and imaginary parts as two channels),
  hinge loss, plus the generator's feature-matching loss on its intermediate activations.
- `PerceptualLoss`: an LPIPS-style distance (unit-normalized features, squared difference, mean over layers, no learned
  layer weights) with a network loaded from a local file, never downloaded: a `.safetensors` state dict of VGG16's
  `features` (torchvision's layout, with or without the `features.` prefix) or a TorchScript module that maps images
  (N, 3, H, W) in [-1, 1] to a feature tensor or a list of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def _check_common(cfg) -> None:
    if cfg.channels < 1 or cfg.weight < 0 or cfg.start_step < 0:
        raise ValueError(f"discriminator: channels must be >= 1, weight >= 0 and start_step >= 0, got "
                         f"{cfg.channels!r}, {cfg.weight!r}, {cfg.start_step!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Video discriminator with LeCam regularization


@dataclass(frozen=True)
class VideoDiscriminatorConfig:
    enabled: bool = False
    channels: int = 64
    channel_mults: tuple[int, ...] = (2, 4, 4, 4)  # one stride-2 (time and space) block per entry
    weight: float = 0.1  # of the generator's adversarial loss
    # Scale the adversarial term by |grad of the other losses| / |grad of the adversarial loss| at the decoder's last
    # layer (VQGAN's balance), times `weight`, so it neither drowns nor is drowned by the reconstruction.
    adaptive_weight: bool = False
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    start_step: int = 0  # the discriminator trains, and the generator gets its adversarial loss, from this step on

    def __post_init__(self):
        _check_common(self)
        if not (0 <= self.lecam_decay < 1 and self.lecam_weight >= 0):
            raise ValueError(f"discriminator: lecam_decay must lie in [0, 1) and lecam_weight be >= 0, got "
                             f"{self.lecam_decay!r} and {self.lecam_weight!r}")


class VideoDiscriminator(nn.Module):
    def __init__(self, cfg: VideoDiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels] + [cfg.channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [nn.Conv3d(3, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv3d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv3d(cout, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv3d(widths[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        """Video (B, 3, T, H, W) -> patch logits (B, 1, t, h, w)."""
        return self.net(x)

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        real_logits, fake_logits = self(real), self(fake.detach())
        hinge = hinge_discriminator_loss(real_logits, fake_logits)
        lecam = (F.relu(real_logits - self.ema_fake).pow(2).mean()
                 + F.relu(self.ema_real - fake_logits).pow(2).mean())
        if self.training:
            with torch.no_grad():
                self.ema_real.lerp_(real_logits.mean(), 1 - self.cfg.lecam_decay)
                self.ema_fake.lerp_(fake_logits.mean(), 1 - self.cfg.lecam_decay)
        total = hinge + self.cfg.lecam_weight * lecam
        return total, {"disc_hinge": hinge.detach(), "disc_lecam": lecam.detach()}

    def generator_loss(self, fake: Tensor) -> Tensor:
        return -self(fake).mean()


# ---------------------------------------------------------------------------------------------------------------------
# STFT discriminator with feature matching


@dataclass(frozen=True)
class STFTDiscriminatorConfig:
    enabled: bool = False
    channels: int = 32
    window: int = 1024
    hop: int = 256
    strides: tuple[int, ...] = (2, 2, 2, 2, 2, 2)  # frequency stride of each block; time strides alternate 1, 2
    weight: float = 1.0  # of the generator's adversarial loss
    feature_weight: float = 100.0  # of the feature-matching loss (SoundStream's lambda_feat)
    start_step: int = 0  # the discriminator trains, and the generator gets its adversarial losses, from this step on

    def __post_init__(self):
        _check_common(self)
        if self.feature_weight < 0 or self.hop < 1 or self.window < 2:
            raise ValueError(f"discriminator: feature_weight must be >= 0, hop >= 1 and window >= 2, got "
                             f"{self.feature_weight!r}, {self.hop!r}, {self.window!r}")


class STFTDiscriminator(nn.Module):
    def __init__(self, cfg: STFTDiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.window), persistent=False)
        layers = [nn.Conv2d(2, cfg.channels, 7, padding=3)]
        ch = cfg.channels
        for i, stride in enumerate(cfg.strides):
            cout = min(ch * 2, 16 * cfg.channels)
            layers.append(nn.Conv2d(ch, cout, (3, 2 * stride + 1), stride=(1 + i % 2, stride), padding=(1, stride)))
            ch = cout
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Conv2d(ch, 1, (1, 3), padding=(0, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Audio (B, samples) -> (logits (B, 1, frames', bins'), activations of every block)."""
        spec = torch.stft(x.float(), self.cfg.window, self.cfg.hop, window=self.window, return_complex=True)
        h = rearrange(torch.view_as_real(spec), "b f t c -> b c t f")
        features = []
        for block in self.blocks:
            h = F.leaky_relu(block(h), 0.2)
            features.append(h)
        return self.head(h), features

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        hinge = hinge_discriminator_loss(self(real)[0], self(fake.detach())[0])
        return hinge, {"disc_hinge": hinge.detach()}

    def generator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Adversarial hinge + feature matching (L1 between activations on real and fake, relative to the real)."""
        fake_logits, fake_features = self(fake)
        with torch.no_grad():
            _, real_features = self(real)
        adversarial = F.relu(1 - fake_logits).mean()
        matching = sum(F.l1_loss(f, r) / r.abs().mean().clamp_min(1e-8)
                       for f, r in zip(fake_features, real_features)) / len(real_features)
        total = self.cfg.weight * adversarial + self.cfg.feature_weight * matching
        return total, {"gen_adversarial": adversarial.detach(), "gen_feature_matching": matching.detach()}


# ---------------------------------------------------------------------------------------------------------------------
# Perceptual loss

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's `features`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk with torchvision's module indices (so its state dicts load as they are)."""
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU(inplace=False)]
            cin = item
    return nn.Sequential(*layers)


class VGGTaps(nn.Module):
    """VGG16 features at the LPIPS layers, taking images in [-1, 1]."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = ((x + 1) / 2 - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features[: VGG16_TAPS[-1] + 1]):
            h = layer(h)
            if i in VGG16_TAPS:
                taps.append(h)
        return taps


def load_perceptual_network(path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual network {path} does not exist (a VGG16 .safetensors or TorchScript file)")
    if path.suffix == ".safetensors":
        state = {k.removeprefix("features."): v for k, v in load_file(str(path)).items()}
        features = vgg16_features()
        try:
            features.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"perceptual network {path}: not a VGG16 features state dict ({e})") from None
        return VGGTaps(features)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise ValueError(f"perceptual network {path}: not a TorchScript module ({e})") from None


class PerceptualLoss(nn.Module):
    def __init__(self, path: str | Path):
        super().__init__()
        self.net = load_perceptual_network(path).eval()
        for p in self.net.parameters():  # ScriptModules lack requires_grad_()
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # the network is frozen: keep it in eval mode

    def features(self, images: Tensor) -> list[Tensor]:
        out = self.net(images)
        return [out] if isinstance(out, Tensor) else list(out)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between videos (B, 3, T, H, W) (or images (B, 3, H, W)) in [-1, 1], frames compared as images."""
        if x.ndim == 5:
            x, y = (rearrange(v, "b c t h w -> (b t) c h w") for v in (x, y))
        fx, fy = self.features(x), self.features(y)
        distances = [(F.normalize(a, dim=1, eps=1e-10) - F.normalize(b, dim=1, eps=1e-10)).pow(2).sum(1).mean()
                     for a, b in zip(fx, fy)]
        return sum(distances) / len(distances)
