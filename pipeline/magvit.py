"""MAGVIT-v2 video tokenizer: a causal 3D CNN encoder and decoder around lookup-free quantization (LFQ).

Layout: videos are float tensors in [-1, 1] shaped (B, 3, T, H, W), channels first as torch convolutions want them
(`video_to_tensor` converts decoded uint8 frames (B, T, H, W, 3)). With the paper's four levels (8x spatial, 4x
temporal compression) T must be 1 + 4k and H, W multiples of 8; codes are int64 (B, t, h, w) with t = 1 + k,
h = H / 8, w = W / 8, values in [0, 2^bits): 17x128x128 -> (5, 16, 16). Fewer levels compress less (`latent_shape`).

Causality: temporal convolutions pad the past only (with zeros) and group norms normalize each frame on its own, so
latent frame j sees input frames <= 4j and the first frame is encoded by itself. An image (T = 1) is a valid input:
its codes equal the first latent frame of any video that starts with it (in exact arithmetic; floating point may
differ in the last bits between the two shapes). Down-sampling is a strided causal convolution (T: 1 + 2k -> 1 + k);
up-sampling is depth-to-space (a convolution to s_t * 2 * 2 times the channels, rearranged into time and space) that
drops the first s_t - 1 frames so 1 + k latent frames grow back to 1 + s_t k. The decoder's group norms are adaptive:
their scale and shift are 1x1 projections of the quantized latent, broadcast to each resolution in the causal frame
order (decoded frame f takes latent frame ceil(f / s) at time scale s). Inside the networks activations are
frame-major (B, T, C, H, W), so per-frame operations are views of (B*T, C, H, W).

Image-to-video: the image tokenizer is this same model trained on single frames; a single frame only ever meets the
last (present) tap of each causal temporal kernel and the last sub-frame of each temporal up-sampler.
`inflate_from_image` builds the video tokenizer from it: spatial kernels go to the present tap (earlier taps zero)
and every up-sampled sub-frame starts as a copy of the trained one. The inflated model tokenizes images exactly as
the image model does and latent frame j of a video as the image model tokenizes frame 4j; video training starts there.

Training: `loss(x)` is reconstruction + LFQ (commitment + entropy penalty). The optional perceptual loss and 3D GAN
discriminator (LeCam-regularized) live in `pipeline.adversarial` and are training settings of the app
(`train.tokenizers`), which adds them to `objective(x, out)`; their weights stay out of tokenizer checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from pipeline.checkpoint import fingerprint
from pipeline.metrics import psnr
from pipeline.quantizers import LFQ, LFQConfig, Quantized, bits_to_codes


def video_to_tensor(frames: np.ndarray | Tensor) -> Tensor:
    """uint8 frames (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 (B, T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return rearrange(frames.float() / 127.5 - 1, "b t h w c -> b c t h w")


def tensor_to_video(x: Tensor) -> Tensor:
    """Float (B, 3, T, H, W) in [-1, 1] -> uint8 frames (B, T, H, W, 3), clamping."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "b c t h w -> b t h w c")


def expand_latent(q: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Broadcast a frame-major latent (B, t, C, h, w) to (B, T, C, H, W) in causal frame order: frame f takes latent
    frame ceil(f / s), s = (T - 1) / (t - 1), the frame that up-sampling grew it from."""
    frames, height, width = size
    t, _, h, w = q.shape[1:]
    if t > 1:
        scale = (frames - 1) // (t - 1)
        index = (torch.arange(frames, device=q.device) + scale - 1) // scale
    else:
        index = torch.zeros(frames, dtype=torch.long, device=q.device)
    return repeat(q.index_select(1, index), "b t c h w -> b t c (h sh) (w sw)", sh=height // h, sw=width // w)


def per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D module to every frame of (B, T, C, H, W)."""
    return module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


# ---------------------------------------------------------------------------------------------------------------------
# Blocks. Activations are frame-major, (B, T, C, H, W): per-frame ops are then views of (B*T, C, H, W).


class CausalConv3d(nn.Module):
    """A 3D convolution padded in time on the past only (zeros) and 'same' in space.

    The weight is a Conv3d's (out, in, kt, kh, kw); it runs as one 2D convolution over the kt most recent frames stacked
    on channels, which is 5-10x faster than conv3d on CPU and as fast on GPU.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_stride: int = 1, space_stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel)  # holds the parameters, with Conv3d's initialization
        self.kernel, self.time_stride, self.space_stride = kernel, time_stride, space_stride

    def forward(self, x: Tensor) -> Tensor:
        k, st = self.kernel, self.time_stride
        frames = (x.shape[1] - 1) // st + 1
        padded = F.pad(x, (0, 0, 0, 0, 0, 0, k - 1, 0))
        stacked = torch.cat([padded[:, i: i + st * (frames - 1) + 1: st] for i in range(k)], dim=2)
        weight = rearrange(self.conv.weight, "o i t h w -> o (t i) h w")
        y = F.conv2d(stacked.flatten(0, 1), weight, self.conv.bias, stride=self.space_stride, padding=k // 2)
        return y.unflatten(0, (x.shape[0], frames))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame: statistics never mix frames, which keeps the model causal."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class AdaptiveGroupNorm(nn.Module):
    """Frame group norm whose scale and shift are 1x1 projections of the quantized latent (zero-initialized), computed
    at the latent's resolution and broadcast to the activation's."""

    def __init__(self, groups: int, channels: int, latent_channels: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels)
        self.modulation = nn.Conv2d(latent_channels, 2 * channels, 1)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        modulation = expand_latent(per_frame(self.modulation, latent), (x.shape[1], *x.shape[3:]))
        scale, shift = modulation.chunk(2, dim=2)
        return self.norm(x) * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return per_frame(self.skip, x) + self.conv2(F.silu(self.norm2(h)))


class AdaptiveResBlock(nn.Module):
    """The decoder's residual block: adaptive group norms conditioned on the quantized latent."""

    def __init__(self, cin: int, cout: int, groups: int, latent_channels: int):
        super().__init__()
        self.norm1 = AdaptiveGroupNorm(groups, cin, latent_channels)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = AdaptiveGroupNorm(groups, cout, latent_channels)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x, latent)))
        return per_frame(self.skip, x) + self.conv2(F.silu(self.norm2(h, latent)))


class Downsample(nn.Module):
    """Strided causal convolution: space / 2, and time 1 + 2k -> 1 + k when `temporal`."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, time_stride=2 if temporal else 1, space_stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Depth-to-space: space x 2, and time 1 + k -> 1 + 2k when `temporal` (the first extra frame is dropped)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.time_factor = 2 if temporal else 1
        factor = self.time_factor * 4
        self.conv = CausalConv3d(channels, channels * factor)
        # every sub-position starts as the same filter: the initial map is nearest-neighbour up-sampling
        with torch.no_grad():
            for tensor in (self.conv.conv.weight, self.conv.conv.bias):
                tensor.copy_(tensor[::factor].repeat_interleave(factor, dim=0))

    def forward(self, x: Tensor) -> Tensor:
        st = self.time_factor
        y = rearrange(self.conv(x), "b t (c st sh sw) h w -> b (t st) c (h sh) (w sw)", st=st, sh=2, sw=2)
        return y[:, st - 1:]


# ---------------------------------------------------------------------------------------------------------------------
# Encoder and decoder (frame-major in and out)


class Encoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        g = cfg.norm_groups
        self.conv_in = CausalConv3d(3, widths[0])
        self.blocks = nn.ModuleList()
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.res_blocks):
                self.blocks.append(ResBlock(ch, width, g))
                ch = width
            if level < len(widths) - 1:
                self.blocks.append(Downsample(ch, cfg.temporal_downsample[level]))
        self.blocks.extend(ResBlock(ch, ch, g) for _ in range(cfg.res_blocks))
        self.norm_out = FrameGroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, cfg.quantizer.bits, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        return per_frame(self.conv_out, F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mults]
        g, bits = cfg.norm_groups, cfg.quantizer.bits
        ch = widths[-1]
        self.conv_in = CausalConv3d(bits, ch)
        self.blocks = nn.ModuleList(AdaptiveResBlock(ch, ch, g, bits) for _ in range(cfg.res_blocks))
        for level in reversed(range(len(widths))):
            for _ in range(cfg.res_blocks):
                self.blocks.append(AdaptiveResBlock(ch, widths[level], g, bits))
                ch = widths[level]
            if level > 0:
                self.blocks.append(Upsample(ch, cfg.temporal_downsample[level - 1]))
        self.norm_out = AdaptiveGroupNorm(g, ch, bits)
        self.conv_out = CausalConv3d(ch, 3)

    def forward(self, q: Tensor) -> Tensor:
        h = self.conv_in(q)
        for block in self.blocks:
            h = block(h, q) if isinstance(block, AdaptiveResBlock) else block(h)
        return self.conv_out(F.silu(self.norm_out(h, q)))


# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class MagvitConfig:
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry; 2x spatial down-sampling between levels
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per down-sampling step: also halve time
    res_blocks: int = 4  # per level, and in the middle
    norm_groups: int = 32
    quantizer: LFQConfig = field(default_factory=LFQConfig)
    recon_loss: Literal["l1", "l2"] = "l2"
    recon_weight: float = 1.0

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.channel_mults) - 1:
            raise ValueError(f"MagvitConfig: temporal_downsample needs one entry per down-sampling step "
                             f"({len(self.channel_mults) - 1}), got {len(self.temporal_downsample)}")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"MagvitConfig: width {self.base_channels * m} is not divisible by "
                                 f"norm_groups={self.norm_groups}")


@dataclass
class TokenizerOutput:
    reconstruction: Tensor  # (B, 3, T, H, W)
    codes: Tensor  # (B, t, h, w)
    quantized: Quantized


class MagvitModel(nn.Module):
    def __init__(self, cfg: MagvitConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = LFQ(cfg.quantizer)
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.channel_mults) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.config.temporal_downsample)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the codes of a (frames, height, width) video; raises for shapes the model cannot take."""
        s, r = self.spatial_factor, self.temporal_factor
        if frames < 1 or (frames - 1) % r:
            raise ValueError(f"video: {frames} frames; the tokenizer needs 1 + {r}k frames "
                             f"(1, {1 + r}, {1 + 2 * r}, ...)")
        if height < s or width < s or height % s or width % s:
            raise ValueError(f"video: frame size {height}x{width} must be a positive multiple of {s}")
        return 1 + (frames - 1) // r, height // s, width // s

    def check_video(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"video: expected a float tensor in [-1, 1], got {getattr(x, 'dtype', type(x))} "
                            "(convert uint8 frames with pipeline.magvit.video_to_tensor)")
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video: expected shape (B, 3, T, H, W), got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        if not x.is_meta and not torch.isfinite(x).all():
            raise ValueError("video: contains NaN or infinite values")

    def check_codes(self, codes: Tensor) -> None:
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"codes: expected an int64 tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 4:
            raise ValueError(f"codes: expected shape (B, t, h, w), got {tuple(codes.shape)}")
        if not codes.is_meta and codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes: values must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")

    def encode_latent(self, x: Tensor) -> Tensor:
        """Continuous encoder output, channel-last (B, t, h, w, bits), before quantization."""
        self.check_video(x)
        z = self.encoder(rearrange(x, "b c t h w -> b t c h w"))
        return rearrange(z, "b t d h w -> b t h w d")

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> int64 codes (B, t, h, w)."""
        return bits_to_codes(self.encode_latent(x))

    def decode_latent(self, q: Tensor) -> Tensor:
        """Quantized latent (B, t, h, w, bits) -> video (B, 3, T, H, W)."""
        y = self.decoder(rearrange(q, "b t h w d -> b t d h w"))
        return rearrange(y, "b t c h w -> b c t h w")

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, t, h, w) -> video (B, 3, 1 + r(t-1), sh, sw) for temporal and spatial factors r and s, roughly in
        [-1, 1] (not clamped)."""
        self.check_codes(codes)
        return self.decode_latent(self.quantizer.decode_codes(codes.long()))

    def forward(self, x: Tensor) -> TokenizerOutput:
        quantized = self.quantizer(self.encode_latent(x))
        return TokenizerOutput(self.decode_latent(quantized.latent), quantized.codes, quantized)

    def objective(self, x: Tensor, out: TokenizerOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction + quantizer loss of a forward pass; returns (total, detached terms for logging)."""
        if self.config.recon_loss == "l1":
            recon = F.l1_loss(out.reconstruction, x)
        else:
            recon = F.mse_loss(out.reconstruction, x)
        total = self.config.recon_weight * recon + out.quantized.loss
        terms = {"recon": recon.detach(), "psnr": psnr(x, out.reconstruction.detach(), peak=2.0),
                 **{f"lfq_{k}": v for k, v in out.quantized.terms.items()}}
        return total, terms

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.objective(x, self(x))

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# Image-to-video inflation


@torch.no_grad()
def inflate_from_image(image_model: MagvitModel) -> MagvitModel:
    """A video tokenizer initialized from an image tokenizer (the same architecture trained on 1-frame inputs)."""
    video = MagvitModel(image_model.config)
    video.load_state_dict(image_model.state_dict())
    for module in video.modules():
        if isinstance(module, CausalConv3d):
            module.conv.weight[:, :, :-1] = 0
        if isinstance(module, Upsample):
            # the image model trained only the last sub-frame (the one kept for frame 0): copy it to all sub-frames
            st = module.time_factor
            for tensor in (module.conv.conv.weight, module.conv.conv.bias):
                groups = tensor.unflatten(0, (-1, st, 4))  # a view: channels are ordered (c, st, sh, sw)
                groups.copy_(groups[:, -1:].expand_as(groups).clone())
    return video
