import math

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.metrics import si_snr
from pipeline.soundstream import (SoundStreamConfig, SoundStreamModel, hz_to_mel, mel_filterbank, mel_to_hz,
                                  preemphasis)

SR = 16000


def debug_model(seed: int = 0) -> SoundStreamModel:
    torch.manual_seed(seed)
    return SoundStreamModel(load_config(SoundStreamConfig, "debug", kind="audio_tokenizer"))


def tones(n: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Sums of 1-3 sinusoids (110-1760 Hz, random phase), (n, samples) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    out = np.zeros((n, samples), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            out[i] += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(110, 1760) * t + rng.uniform(0, 6.3))
    return torch.from_numpy(out)


def trained_debug_model() -> SoundStreamModel:
    """A debug model after one training step, so its RVQ codebooks are initialized from data."""
    model = debug_model()
    model.loss(tones(2, 3200))
    return model.eval()


def test_shapes_and_frame_count():
    model = trained_debug_model()
    x = tones(2, 34000)
    codes = model.encode(x)
    assert codes.shape == (2, 2, 106) == (2, *model.latent_shape(34000))
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    assert model.decode(codes).shape == (2, 106 * 320)
    assert model.decode(codes[:, :1]).shape == (2, 106 * 320)  # the coarse level alone
    assert model.hop_length == 320 and model.frame_rate == 50.0
    for samples in (320, 639, 640, 4799):
        assert model.encode(tones(1, samples)).shape[-1] == samples // 320 == model.latent_shape(samples)[1]


def test_forward_loss_and_gradients():
    model = debug_model().train()
    x = tones(2, 3300)
    out = model(x)
    assert out.reconstruction.shape == (2, 3200) and out.codes.shape == (2, 2, 10)
    total, terms = model.objective(x, out)
    total.backward()
    assert {"waveform", "spectral", "preemphasis", "si_snr", "rvq_commitment"} <= set(terms)
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_encoder_is_causal():
    model = trained_debug_model()
    x = tones(1, 6400, seed=1)
    codes = model.encode(x)
    changed = x.clone()
    changed[:, 3200:] = tones(1, 3200, seed=2)
    codes2 = model.encode(changed)
    assert torch.equal(codes2[..., :10], codes[..., :10])  # frames 0-9 end at sample 3200
    assert not torch.equal(codes2[..., 10:], codes[..., 10:])


def test_decode_equals_quantized_latent():
    model = trained_debug_model()
    x = tones(2, 3200)
    out = model(x)
    assert torch.equal(out.codes, model.encode(x))
    assert torch.allclose(model.decode(out.codes), out.reconstruction, atol=1e-5)


def test_mel_filterbank():
    fb = mel_filterbank(512, 32, SR)
    assert fb.shape == (32, 257)
    assert float(fb.min()) >= 0 and float(fb.max()) <= 1
    assert (fb.sum(1) > 0).all()  # no empty filter
    freqs = np.linspace(0, SR / 2, 257)
    mel = np.linspace(0, 2595 * np.log10(1 + SR / 2 / 700), 34)
    edges = 700 * (10 ** (mel / 2595) - 1)
    for m in (3, 17, 30):  # an independent triangle: rises from edge m to edge m+1, falls to edge m+2
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        ref = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
        assert np.allclose(fb[m].numpy(), ref, atol=1e-5)
    assert float(hz_to_mel(torch.tensor(1000.0))) == pytest.approx(1000.0, abs=0.1)  # HTK: 1 kHz = 1000 mel


def test_tone_lands_in_its_mel_band():
    model = debug_model()
    t = torch.arange(8000) / SR
    spec = model.mel_spectrogram(torch.sin(2 * math.pi * 1000 * t)[None], 512)  # (1, 32 mels, frames)
    centers = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(SR / 2.0))), 34))[1:-1]
    assert abs(float(centers[spec[0].mean(-1).argmax()]) - 1000) < 200


def test_spectral_loss_is_zero_only_for_equal_signals():
    model = debug_model()
    x = tones(2, 3200)
    assert float(model.spectral_loss(x, x)) == 0.0
    assert float(model.spectral_loss(x, 0.5 * x)) > 0.1
    with pytest.raises(ValueError, match="too short"):
        model.spectral_loss(x[:, :200], x[:, :200])


def test_preemphasis_weighs_errors_by_frequency():
    t = torch.arange(16000) / SR
    x = preemphasis(torch.sin(2 * math.pi * 220 * t)[None])
    assert x.shape == (1, 15999) and torch.allclose(x[0, :5], torch.sin(2 * math.pi * 220 * t[1:6])
                                                     - 0.95 * torch.sin(2 * math.pi * 220 * t[:5]))
    # |1 - 0.95 e^(-iw)| at w = 2 pi f / SR: the same error amplitude at 2 kHz counts ~8x more than at 220 Hz
    low, high = (preemphasis(0.1 * torch.sin(2 * math.pi * f * t)[None]).pow(2).mean().sqrt() for f in (220, 2000))
    gain = [abs(1 - 0.95 * np.exp(-2j * np.pi * f / SR)) for f in (220, 2000)]
    assert float(high / low) == pytest.approx(gain[1] / gain[0], rel=0.01) and gain[1] / gain[0] > 7


def test_si_snr_reference_values():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 4000, generator=g)
    noise = torch.randn(3, 4000, generator=g)
    noise = noise - (noise * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True) * ref  # orthogonal to ref
    noise = noise - noise.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    noise = noise * (ref.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)) * 10 ** (-12 / 20)
    assert float(si_snr(ref, ref + noise)) == pytest.approx(12.0, abs=0.05)
    assert float(si_snr(ref, 3.0 * ref + 3.0 * noise)) == pytest.approx(12.0, abs=0.05)  # scale-invariant


def test_bad_inputs():
    model = trained_debug_model()
    with pytest.raises(ValueError, match="at least 320"):
        model.encode(torch.zeros(1, 319))
    with pytest.raises(ValueError, match=r"\(B, samples\)"):
        model.encode(torch.zeros(1, 1, 3200))
    with pytest.raises(ValueError, match=r"\(B, samples\)"):
        model.encode(torch.zeros(3200))
    with pytest.raises(TypeError, match="float"):
        model.encode(torch.zeros(1, 3200, dtype=torch.int16))
    x = tones(1, 3200)
    x[0, 100] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.encode(x)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 2, 5), 64))
    with pytest.raises(ValueError, match="levels <= 2"):
        model.decode(torch.zeros(1, 3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model.decode(torch.zeros(1, 2, 5))


def test_paper_flavor_on_meta_device():
    cfg = load_config(SoundStreamConfig, "paper", kind="audio_tokenizer")
    with torch.device("meta"):
        model = SoundStreamModel(cfg).eval()
        codes = model.encode(torch.empty(2, 34000))
        assert codes.shape == (2, 4, 106)
        assert model.decode(codes).shape == (2, 33920)
    assert model.codebook_size == 1024 and cfg.sample_rate == 16000 and model.hop_length == 320


def test_demo_flavor_sizes():
    cfg = load_config(SoundStreamConfig, "demo", kind="audio_tokenizer")
    model = SoundStreamModel(cfg)
    assert model.latent_shape(34000) == (cfg.quantizer.levels, 106)
    assert 2 <= cfg.quantizer.levels <= 4 and 64 <= model.codebook_size <= 256


@pytest.mark.threshold
def test_debug_overfits_a_few_clips():
    torch.manual_seed(0)
    model = debug_model()
    x = tones(2, 6400)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        total, _ = model.loss(x)
        opt.zero_grad()
        total.backward()
        opt.step()
    model.eval()
    # SI-SNR sits near -40 dB for 75-125 steps (the step it leaves depends on the kernels' reduction order), then
    # climbs. Measured at 250 steps over seeds 0-2, 1/2/4 threads, AVX-512 and AVX2: 12.5-23.3 dB (this seed:
    # 12.5-18.1), and 9.2 dB at worst by step 200, so a 50-step-later start still clears the bar.
    with torch.no_grad():
        assert float(si_snr(x, model.decode(model.encode(x)))) > 6
