"""Quantizers of the two tokenizers: lookup-free quantization (MAGVIT-v2) and residual VQ (SoundStream).

Both take channel-last latents `(..., dim)` and return a `Quantized`: the straight-through quantized latent, the
integer codes, the quantizer loss and its named terms.

LFQ (Yu et al. 2023, "Language Model Beats Diffusion"): the codebook is the corners {-1, +1}^d of a hypercube, so a
latent's code is its sign bits, read most significant bit first (dimension 0 is bit d-1); no lookup and no learned
codebook. The entropy penalty uses the soft assignment p(c | z) = softmax_c(-||z - c||^2 / temperature). Because the
codebook is a product set, p(c | z) factorizes over dimensions, p(c_i = +1 | z) = sigmoid(4 z_i / temperature): the
per-sample entropy is a sum of binary entropies (exact for any d), while the codebook entropy H(E_z[p(c | z)]) is
computed exactly within groups of `entropy_group_bits` bits and summed over groups (2^18 codes are too many to
enumerate; the sum bounds the joint entropy from above and is exact for one group).

RVQ (Zeghidour et al. 2021, "SoundStream"): each level quantizes the residual of the previous ones with a codebook
kept as an exponential moving average of the vectors assigned to it (no codebook gradients), initialized by k-means
on the first training batch; codes whose moving usage falls below `dead_code_threshold` are restarted at random
vectors of the current batch.

Both compute in float32, autocast off: a bf16 straight-through latent z + (q - z) would miss q by a rounding step,
and the entropy terms' matmuls lose their small differences in bf16. The latent returns in the input's dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Quantized:
    latent: Tensor  # quantized latent with straight-through gradients, same shape as the input
    codes: Tensor  # int64: (...) for LFQ, (..., levels) for RVQ
    loss: Tensor  # scalar, already weighted
    terms: dict[str, Tensor]  # unweighted loss terms, detached, for logging


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for this device's type (where autocast exists for it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# Lookup-free quantization


def bit_weights(bits: int, device: torch.device | None = None) -> Tensor:
    """2^(bits-1), ..., 2, 1: dimension 0 is the most significant bit."""
    return 2 ** torch.arange(bits - 1, -1, -1, device=device, dtype=torch.int64)


def bits_to_codes(z: Tensor) -> Tensor:
    """Latents (..., d) -> int64 codes (...) in [0, 2^d): bit i is set where z_i > 0."""
    return ((z > 0).long() * bit_weights(z.shape[-1], z.device)).sum(-1)


def codes_to_bits(codes: Tensor, bits: int) -> Tensor:
    """Int64 codes (...) -> float latents (..., bits) with values in {-1, +1}; the inverse of `bits_to_codes`."""
    set_bits = (codes.unsqueeze(-1) // bit_weights(bits, codes.device)) % 2
    return set_bits.float() * 2 - 1


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (nats) of Bernoulli(sigmoid(logits)), stable for large |logits|."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def group_code_log_probs(logits: Tensor, group_bits: int) -> Tensor:
    """Per-bit logits (N, d) -> log p(code) (N, d / group_bits, 2^group_bits) for each group of consecutive bits."""
    n, d = logits.shape
    groups = logits.reshape(n, d // group_bits, group_bits)
    table = codes_to_bits(torch.arange(2**group_bits, device=logits.device), group_bits)  # (K, k) in {-1, +1}
    on = (table > 0).to(logits.dtype)
    return F.logsigmoid(groups) @ on.T + F.logsigmoid(-groups) @ (1 - on).T


@dataclass(frozen=True)
class LFQConfig:
    bits: int = 18
    entropy_group_bits: int = 9  # codebook entropy is exact within groups of this many bits; must divide `bits`
    temperature: float = 0.01  # of the soft assignment used by the entropy terms only
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    diversity_weight: float = 1.0  # gamma: weight of the codebook entropy inside the entropy penalty


class LFQ(nn.Module):
    def __init__(self, cfg: LFQConfig):
        super().__init__()
        if cfg.bits < 1 or cfg.entropy_group_bits < 1 or cfg.bits % cfg.entropy_group_bits:
            raise ValueError(f"LFQ: entropy_group_bits={cfg.entropy_group_bits} must divide bits={cfg.bits}")
        if cfg.temperature <= 0:
            raise ValueError(f"LFQ: temperature must be positive, got {cfg.temperature}")
        self.cfg = cfg

    @property
    def codebook_size(self) -> int:
        return 2**self.cfg.bits

    def entropies(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, codebook entropy) of the soft code assignments of latents z (..., d), in nats."""
        logits = 4 * z.reshape(-1, self.cfg.bits).float() / self.cfg.temperature
        per_sample = binary_entropy_from_logits(logits).sum(-1).mean()
        avg_probs = group_code_log_probs(logits, self.cfg.entropy_group_bits).exp().mean(0)
        codebook = -(avg_probs * avg_probs.clamp_min(1e-12).log()).sum()
        return per_sample, codebook

    def quantize(self, z: Tensor) -> Tensor:
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    def forward(self, z: Tensor) -> Quantized:
        if z.shape[-1] != self.cfg.bits:
            raise ValueError(f"LFQ: latent has {z.shape[-1]} channels, expected bits={self.cfg.bits}")
        with full_precision(z.device):
            zf = z.float()
            q = self.quantize(zf)
            commitment = F.mse_loss(zf, q.detach())
            per_sample, codebook = self.entropies(zf)
            entropy = per_sample - self.cfg.diversity_weight * codebook
            loss = self.cfg.commitment_weight * commitment + self.cfg.entropy_weight * entropy
            latent = (zf + (q - zf).detach()).to(z.dtype)
        terms = {"commitment": commitment, "sample_entropy": per_sample, "codebook_entropy": codebook}
        return Quantized(latent, bits_to_codes(z), loss, {k: v.detach() for k, v in terms.items()})

    def decode_codes(self, codes: Tensor) -> Tensor:
        return codes_to_bits(codes, self.cfg.bits)


# ---------------------------------------------------------------------------------------------------------------------
# Residual vector quantization with EMA codebooks


def kmeans(x: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on x (N, D) from k random points (drawn with replacement when N < k); empty clusters stay put.
    Returns (centroids (k, D), how many points each centroid has)."""
    centroids = x[torch.randint(len(x), (k,), device=x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(-1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, torch.bincount(torch.cdist(x, centroids).argmin(-1), minlength=k)


@dataclass(frozen=True)
class RVQConfig:
    levels: int = 4
    codebook_size: int = 1024
    decay: float = 0.99  # EMA decay of codebook statistics
    commitment_weight: float = 1.0
    # moving usage (vectors per batch) below which a code restarts at a batch vector; keep it well under
    # batch vectors / codebook_size, or live codes keep restarting
    dead_code_threshold: float = 2.0
    kmeans_iters: int = 10  # on the first training batch; 0 initializes from random batch vectors
    epsilon: float = 1e-5  # Laplace smoothing of cluster sizes


class EMACodebook(nn.Module):
    """One VQ level. Codebook statistics are buffers, updated in `update` (called by forward in training mode)."""

    def __init__(self, cfg: RVQConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("embed", torch.randn(cfg.codebook_size, dim))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("initialized", torch.tensor(False))

    def assign(self, x: Tensor) -> Tensor:
        """Nearest codeword (L2) of each row of x (N, D). cdist runs in float32 under autocast, so codes do not
        depend on the precision the encoder ran in."""
        return torch.cdist(x.float(), self.embed.float()).argmin(-1)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """k-means on the batch; each code starts with its cluster's size as usage (empty clusters restart at once)."""
        centroids, counts = kmeans(x.float(), self.cfg.codebook_size, self.cfg.kmeans_iters)
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_sum.copy_(centroids * counts[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, x: Tensor, codes: Tensor) -> None:
        """EMA of per-code counts and vector sums, then restart codes whose moving usage fell below the threshold."""
        cfg, x = self.cfg, x.float()
        counts = torch.bincount(codes, minlength=cfg.codebook_size).to(x.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, x)
        self.cluster_size.lerp_(counts, 1 - cfg.decay)
        self.embed_sum.lerp_(sums, 1 - cfg.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.epsilon) / (total + cfg.codebook_size * cfg.epsilon) * total
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < cfg.dead_code_threshold
        if dead.any():
            picks = x[torch.randint(len(x), (int(dead.sum()),), device=x.device)]
            self.embed[dead] = picks
            self.embed_sum[dead] = picks * cfg.dead_code_threshold
            self.cluster_size[dead] = cfg.dead_code_threshold

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D) -> (codewords (N, D), codes (N,)); in training mode also updates the codebook."""
        if self.training and not bool(self.initialized):
            self.initialize(x)
        codes = self.assign(x)
        codewords = self.embed[codes]
        if self.training:
            self.update(x, codes)
        return codewords, codes


class ResidualVQ(nn.Module):
    def __init__(self, cfg: RVQConfig, dim: int):
        super().__init__()
        if cfg.levels < 1 or cfg.codebook_size < 2:
            raise ValueError(f"RVQ: need levels >= 1 and codebook_size >= 2, got {cfg.levels}, {cfg.codebook_size}")
        self.cfg = cfg
        self.dim = dim
        self.codebooks = nn.ModuleList(EMACodebook(cfg, dim) for _ in range(cfg.levels))

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def forward(self, x: Tensor) -> Quantized:
        """x (..., D) -> latent (..., D), codes (..., levels); the commitment term sums over levels."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RVQ: latent has {x.shape[-1]} channels, expected {self.dim}")
        with full_precision(x.device):
            flat = x.reshape(-1, self.dim).float()
            residual, total = flat.detach(), torch.zeros_like(flat)
            codes, commitment = [], flat.new_zeros(())
            for codebook in self.codebooks:
                q, c = codebook(residual)
                commitment = commitment + F.mse_loss(flat - total, q.detach())
                total = total + q
                residual = residual - q
                codes.append(c)
            latent = (flat + (total - flat).detach()).to(x.dtype)
        codes_t = torch.stack(codes, -1).reshape(*x.shape[:-1], self.cfg.levels)
        loss = self.cfg.commitment_weight * commitment
        return Quantized(latent.reshape(x.shape), codes_t, loss, {"commitment": commitment.detach()})

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (..., n) -> the sum of the selected codewords of the first n levels (..., D); n < levels gives the
        coarser reconstructions."""
        return sum(self.codebooks[i].embed[codes[..., i]] for i in range(codes.shape[-1]))
