import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.magvit import (CausalConv3d, MagvitConfig, MagvitModel, expand_latent, inflate_from_image,
                             tensor_to_video, video_to_tensor)
from pipeline.metrics import psnr


def debug_model(seed: int = 0) -> MagvitModel:
    torch.manual_seed(seed)
    return MagvitModel(load_config(MagvitConfig, "debug", kind="video_tokenizer")).eval()


def random_video(b: int = 2, t: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1


def moving_squares(b: int, t: int, size: int, seed: int = 0) -> torch.Tensor:
    """Coloured squares sliding over a flat background, (B, 3, T, H, W) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    video = np.empty((b, t, size, size, 3), np.float32)
    for i in range(b):
        video[i] = rng.uniform(-1, -0.4, 3)
        side, (y, x), (dy, dx) = size // 3, rng.integers(0, size // 2, 2), rng.integers(-1, 2, 2)
        color = rng.uniform(0, 1, 3)
        for f in range(t):
            yy, xx = np.clip(y + dy * f, 0, size - side), np.clip(x + dx * f, 0, size - side)
            video[i, f, yy:yy + side, xx:xx + side] = color
    return torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()


def test_causal_conv_matches_conv3d():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 8, 8)  # (B, T, C, H, W)
    for time_stride, space_stride in [(1, 1), (2, 2), (1, 2)]:
        conv = CausalConv3d(4, 6, time_stride=time_stride, space_stride=space_stride)
        reference = F.conv3d(F.pad(x.transpose(1, 2), (0, 0, 0, 0, 2, 0)), conv.conv.weight, conv.conv.bias,
                             stride=(time_stride, space_stride, space_stride), padding=(0, 1, 1))
        assert torch.allclose(conv(x), reference.transpose(1, 2), atol=1e-5)


def test_expand_latent_follows_causal_frame_order():
    q = torch.arange(3.0).view(1, 3, 1, 1, 1)  # latent frames 0, 1, 2
    expanded = expand_latent(q, (9, 2, 2))
    assert expanded[0, :, 0, 0, 0].tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert expanded.shape == (1, 9, 1, 2, 2)


def test_shapes_and_round_trip_layout():
    model = debug_model()
    x = random_video(2, 17, 32)
    codes = model.encode(x)
    assert codes.shape == (2, 5, 4, 4) == (2, *model.latent_shape(17, 32, 32))
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    assert model.codebook_size == 2**8
    assert model.decode(codes).shape == x.shape
    out = model(x)
    assert out.reconstruction.shape == x.shape and torch.equal(out.codes, codes)
    assert model.encode(x[:, :, :1]).shape == (2, 1, 4, 4)
    frames = tensor_to_video(x)
    assert frames.shape == (2, 17, 32, 32, 3) and frames.dtype == torch.uint8
    assert torch.allclose(video_to_tensor(frames), x, atol=1 / 127.5)


def test_loss_backward_reaches_every_parameter():
    model = debug_model().train()
    total, terms = model.loss(random_video(1, 5, 32))
    total.backward()
    assert {"recon", "psnr", "lfq_commitment", "lfq_sample_entropy", "lfq_codebook_entropy"} <= set(terms)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_encoder_is_causal():
    model = debug_model()
    x = random_video(1, 17, 32)
    z, codes = model.encode_latent(x), model.encode(x)
    for frame in (16, 9, 5, 1):
        changed = x.clone()
        changed[:, :, frame] = -changed[:, :, frame]
        first_affected = math.ceil(frame / 4)
        z2, codes2 = model.encode_latent(changed), model.encode(changed)
        assert torch.allclose(z2[:, :first_affected], z[:, :first_affected], atol=1e-5)
        assert torch.equal(codes2[:, :first_affected], codes[:, :first_affected])
        assert not torch.equal(codes2[:, first_affected], codes[:, first_affected])


def test_decoder_is_causal():
    model = debug_model()
    codes = model.encode(random_video(1, 17, 32))
    video = model.decode(codes)
    changed = codes.clone()
    changed[:, 3] = (changed[:, 3] + 1) % model.codebook_size
    video2 = model.decode(changed)
    assert torch.allclose(video2[:, :, :9], video[:, :, :9], atol=1e-5)  # frames 0..8 come from latent frames 0..2
    assert not torch.allclose(video2[:, :, 9], video[:, :, 9])


def test_image_codes_equal_first_latent_frame():
    model = debug_model()
    x = random_video(3, 17, 32, seed=1)
    image_codes = model.encode(x[:, :, :1])
    assert image_codes.shape == (3, 1, 4, 4)
    assert torch.equal(image_codes, model.encode(x)[:, :1])
    assert torch.equal(image_codes, model.encode(x[:, :, :5])[:, :1])
    assert torch.allclose(model.decode(image_codes), model.decode(model.encode(x))[:, :, :1], atol=1e-5)


def test_inflation_from_image_tokenizer():
    image_model = debug_model(seed=3)
    video_model = inflate_from_image(image_model)
    x = random_video(2, 17, 32, seed=2)
    assert torch.equal(video_model.encode(x[:, :, :1]), image_model.encode(x[:, :, :1]))
    codes = video_model.encode(x)
    for j in range(codes.shape[1]):  # latent frame j is the image tokenization of frame 4j
        assert torch.equal(codes[:, j:j + 1], image_model.encode(x[:, :, 4 * j:4 * j + 1]))
    video = video_model.decode(codes)
    for f in (0, 1, 4, 5, 16):  # decoded frame f is the image decoding of latent frame ceil(f / 4)
        j = math.ceil(f / 4)
        assert torch.allclose(video[:, :, f:f + 1], image_model.decode(codes[:, j:j + 1]), atol=1e-5)


@pytest.mark.parametrize("shape, message", [
    ((2, 3, 16, 32, 32), "1 \\+ 4k frames"),
    ((2, 3, 17, 30, 32), "multiple of 8"),
    ((2, 4, 17, 32, 32), "expected shape"),
    ((2, 17, 32, 32, 3), "expected shape"),
    ((3, 17, 32, 32), "expected shape"),
])
def test_bad_video_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        debug_model().encode(torch.zeros(shape))


def test_bad_video_values_and_codes():
    model = debug_model()
    x = random_video(1, 5, 32)
    x[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.encode(x)
    with pytest.raises(TypeError, match="video_to_tensor"):
        model.encode(torch.zeros(1, 3, 5, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode(torch.full((1, 2, 4, 4), 256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model.decode(torch.full((1, 2, 4, 4), -1))
    with pytest.raises(TypeError, match="int64"):
        model.decode(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="expected shape"):
        model.decode(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temporal_downsample"):
        MagvitConfig(channel_mults=(1, 2), temporal_downsample=(True, True))


def test_paper_flavor_on_meta_device():
    cfg = load_config(MagvitConfig, "paper", kind="video_tokenizer")
    with torch.device("meta"):
        model = MagvitModel(cfg)
        codes = model.encode(torch.empty(1, 3, 17, 128, 128))
        assert codes.shape == (1, 5, 16, 16)
        assert model.decode(codes).shape == (1, 3, 17, 128, 128)
        assert model.encode(torch.empty(1, 3, 1, 128, 128)).shape == (1, 1, 16, 16)
    assert cfg.quantizer.bits == 18 and model.codebook_size == 2**18
    assert model.latent_shape(17, 128, 224) == (5, 16, 28)
    assert model.latent_shape(41, 128, 128) == (11, 16, 16)
    assert (cfg.base_channels, cfg.channel_mults) == (128, (1, 2, 2, 4))


def test_demo_flavor_sizes():
    cfg = load_config(MagvitConfig, "demo", kind="video_tokenizer")
    with torch.device("meta"):
        model = MagvitModel(cfg)
    assert model.latent_shape(17, 32, 32) == (5, 8, 8)  # 4x spatial: the demo's 32x32 clips
    assert 2**10 <= model.codebook_size <= 2**14
    assert 3e5 <= sum(p.numel() for p in model.parameters()) <= 3e6


@pytest.mark.threshold
def test_debug_overfits_a_few_clips():
    torch.manual_seed(0)
    model = MagvitModel(load_config(MagvitConfig, "debug", kind="video_tokenizer"))
    x = moving_squares(2, 5, 32)
    flat = float(psnr(x, x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x), peak=2.0))  # mean colours: 14.5 dB
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        total, _ = model.loss(x)
        opt.zero_grad()
        total.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        reconstruction = model.decode(model.encode(x)).clamp(-1, 1)
    # The trajectory depends on the kernels' reduction order (threads, ISA), and the LFQ makes it chaotic: at 120
    # steps one thread gave 30.6 dB, two 23.5. Measured at 80 steps over seeds 0-2, 1/2/4 threads, AVX-512 and AVX2:
    # 22.8-27.4 dB, 7.9 dB over the flat baseline at worst (the untrained model: 6 dB under it). The bar asks 4.
    assert float(psnr(x, reconstruction, peak=2.0)) > flat + 4
