import numpy as np
import pytest
import torch

from pipeline.metrics import codebook_usage, psnr, si_snr, ssim


def noisy_pair(seed=0, shape=(3, 32, 40, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-25, 26, shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_and_ssim_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = noisy_pair()
    assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=255), rel=1e-9)
    reference = np.mean([
        metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255, channel_axis=-1) for x, y in zip(a, b)])
    assert ssim(a, b) == pytest.approx(reference, rel=1e-6)


def test_identical_inputs():
    a, _ = noisy_pair()
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)


def test_si_snr():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16000))
    noise = rng.standard_normal((2, 16000))
    noise -= noise.mean(-1, keepdims=True)
    x -= x.mean(-1, keepdims=True)
    # Orthogonalize so the projection is exact: SI-SNR = 10 log10(|x|^2 / |n|^2), whatever the gain.
    noise -= (noise * x).sum(-1, keepdims=True) / (x * x).sum(-1, keepdims=True) * x
    noise *= 0.1 * np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1, keepdims=True)
    assert si_snr(x, 3.0 * (x + noise)) == pytest.approx(20.0, abs=1e-6)


def test_tensors_give_the_arrays_figures():
    """Training steps log PSNR and SI-SNR of tensors (no host sync); the figures equal the float64 ones."""
    a, b = noisy_pair()
    x = torch.from_numpy(a.astype(np.float32) / 127.5 - 1)
    y = torch.from_numpy(b.astype(np.float32) / 127.5 - 1)
    assert float(psnr(x, y, peak=2.0)) == pytest.approx(psnr(a, b), abs=1e-4)
    rng = np.random.default_rng(1)
    reference = rng.standard_normal((3, 4000))
    estimate = 0.5 * reference + 0.2 * rng.standard_normal((3, 4000))
    figure = si_snr(torch.from_numpy(reference).float(), torch.from_numpy(estimate).float())
    assert float(figure) == pytest.approx(si_snr(reference, estimate), abs=1e-4)


def test_codebook_usage():
    stats = codebook_usage(np.array([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert stats == {"used_fraction": 0.5, "perplexity": pytest.approx(4.0)}
    with pytest.raises(ValueError, match="beyond codebook size"):
        codebook_usage(np.array([9]), 8)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2)), np.zeros((2, 3)))
