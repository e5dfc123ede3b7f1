"""Reconstruction quality and codebook statistics for the tokenizers. Every metric takes (reference, estimate).

PSNR and SI-SNR take numpy arrays (computed in float64, a Python float back) or torch tensors (computed in float32
on their device, a 0-d tensor back, so that a training step logs them without a host sync).

Conventions, stated because implementations differ: PSNR over uint8 pixels (peak 255) of whole clips; SSIM per
frame with an 11-tap Gaussian window (sigma 1.5), population covariances and the standard constants K1 = 0.01,
K2 = 0.03, averaged over channels, frames and clips (as scikit-image's `structural_similarity` with
`gaussian_weights=True, use_sample_covariance=False`); SI-SNR in dB with both signals mean-removed; sharpness as the
ratio of mean spatial gradient magnitudes, estimate over reference.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def psnr(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor, peak: float = 255.0):
    """PSNR in dB over all pixels of uint8 (or [0, peak] float) arrays of the same shape; tensors in [-1, 1] take
    `peak=2`. Identical numpy inputs give inf; tensors clamp the error at 1e-12."""
    if isinstance(reference, torch.Tensor):
        mse = torch.nn.functional.mse_loss(estimate.float(), reference.float())
        return 10 * torch.log10(peak**2 / mse.clamp_min(1e-12))
    reference, estimate = _same_shape(reference, estimate, "psnr")
    mse = np.mean((reference - estimate) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def ssim(reference: np.ndarray, estimate: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM of images or clips shaped (..., H, W, C)."""
    reference, estimate = _same_shape(reference, estimate, "ssim")
    if reference.ndim < 3:
        raise ValueError(f"ssim: expected (..., H, W, C) arrays, got shape {reference.shape}")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    # Filter over H and W only, and stop at the border as scikit-image does (truncate 3.5 sigma -> 11 taps).
    sigma = [0.0] * (reference.ndim - 3) + [1.5, 1.5, 0.0]

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=sigma, truncate=3.5, mode="reflect")

    mu_x, mu_y = blur(reference), blur(estimate)
    var_x = blur(reference * reference) - mu_x**2
    var_y = blur(estimate * estimate) - mu_y**2
    cov = blur(reference * estimate) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    pad = 5  # scikit-image crops the window radius before averaging
    return float(s[..., pad:-pad, pad:-pad, :].mean())


def si_snr(reference: np.ndarray | torch.Tensor, estimate: np.ndarray | torch.Tensor, eps: float = 1e-12):
    """Scale-invariant SNR in dB of (..., samples) signals, averaged over leading axes."""
    if isinstance(reference, torch.Tensor):
        reference = reference.float() - reference.float().mean(-1, keepdim=True)
        estimate = estimate.float() - estimate.float().mean(-1, keepdim=True)
        scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
        target = scale * reference
        noise = estimate - target
        return (10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))).mean()
    reference, estimate = _same_shape(reference, estimate, "si_snr")
    reference = reference - reference.mean(axis=-1, keepdims=True)
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    scale = (estimate * reference).sum(-1, keepdims=True) / ((reference**2).sum(-1, keepdims=True) + eps)
    target = scale * reference
    noise = estimate - target
    return float(np.mean(10 * np.log10(((target**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))))


def sharpness(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Edge sharpness of `estimate` relative to `reference`, images or clips (..., H, W, C): the ratio of their mean
    spatial gradient magnitudes (finite differences along H and W). 1 keeps the edges; below 1 is blur."""
    reference, estimate = _same_shape(reference, estimate, "sharpness")
    if reference.ndim < 3:
        raise ValueError(f"sharpness: expected (..., H, W, C) arrays, got shape {reference.shape}")

    def gradient(x: np.ndarray) -> float:
        dy, dx = np.diff(x, axis=-3)[..., :, :-1, :], np.diff(x, axis=-2)[..., :-1, :, :]
        return float(np.sqrt(dy**2 + dx**2).mean())

    return gradient(estimate) / max(gradient(reference), 1e-12)


def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Share of the codebook used and the perplexity (exp of the code entropy) over a set of codes."""
    counts = np.bincount(np.asarray(codes).reshape(-1).astype(np.int64), minlength=codebook_size)
    if counts.size > codebook_size:
        raise ValueError(f"codebook_usage: codes reach {counts.size - 1}, beyond codebook size {codebook_size}")
    p = counts[counts > 0] / counts.sum()
    return {"used_fraction": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {b.shape}")
    return a, b
