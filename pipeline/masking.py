"""MAGVIT masked token modeling: the cosine schedule, training corruptions, and iterative parallel decoding with
classifier-free guidance over two conditions (a low-resolution input and text).

Tokens may be factorized: a position holds K sub-tokens, each a V-way choice, so tokens are int64 (B, N, K) and logits
float (B, N, K, V). A position's log-probability is the sum over its K sub-tokens (the heads are independent given the
context).

Training. Per example draw r ~ U(0, 1) and mask ceil(N cos(pi/2 r)) of its N positions (at least one), chosen
uniformly; the loss is the cross-entropy on masked positions only. The conditions are corrupted on the way in:
discrete noise replaces each low-resolution code by a uniformly random code with probability p ~ U(0, lr_noise), one p
per example, so the model learns to distrust its input as the previous stage's samples will require; the low-res and
text conditions are each dropped independently (lr_drop, text_drop), which trains the unconditional predictions that
guidance needs.

Decoding (MaskGIT). All N positions start masked. Step s = 1..S predicts every position, samples a token for each
masked one and keeps the most confident, so that exactly n_s = floor(N cos(pi/2 s / S)) stay masked afterwards (made
strictly decreasing, so every step commits at least one position and step S commits the rest). Confidence is the
sampled token's log-probability plus Gumbel noise scaled by choice_temperature * (1 - s / S): early steps explore,
the last ones are greedy. Committed positions are never masked again.

Guidance. With logits l(lr, text), l(lr, -) (text dropped) and l(-, -) (both dropped):

    guided = l(-, -) + s_lr (l(lr, -) - l(-, -)) + s_text (l(lr, text) - l(lr, -))

low-res guidance steps from nothing to the low-res input, text guidance from the low-res input to both (the nesting
InstructPix2Pix uses for two conditions). s_lr = s_text = 1 is the plain conditional l(lr, text); s_text = 0 ignores
the text; both 0 is unconditional. As weights of the three passes it reads s_text l(lr, text) + (s_lr - s_text)
l(lr, -) + (1 - s_lr) l(-, -); passes of weight 0 are skipped. Without text l(lr, text) = l(lr, -), leaving
s_lr l(lr, -) + (1 - s_lr) l(-, -). Logits and log-probabilities give the same guided distribution, since the weights
sum to 1 and softmax ignores a per-position constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# (keep the low-res input, keep the text) for one forward pass of classifier-free guidance
Condition = tuple[bool, bool]
# (tokens (B, N, K), masked (B, N)) -> logits (B, N, K, V); masked positions' tokens are placeholders
Predictor = Callable[[Tensor, Tensor], Tensor]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


# ---------------------------------------------------------------------------------------------------------------------
# Training


def mask_ratio(r: Tensor) -> Tensor:
    """MAGVIT's cosine schedule: the masked fraction at r in [0, 1] (1 at r = 0, 0 at r = 1)."""
    return torch.cos(math.pi / 2 * r)


def mask_counts(r: Tensor, length: int) -> Tensor:
    """Masked positions of a length-N sequence at schedule points r: ceil(N cos(pi/2 r)), clamped to [1, N]."""
    return (mask_ratio(r) * length).ceil().clamp(1, length).long()


def random_ranks(batch: int, length: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A uniformly random permutation rank (0..N-1) for every position of every row."""
    scores = torch.rand(batch, length, generator=generator, device=device)
    return scores.argsort(dim=1).argsort(dim=1)


def sample_mask(batch: int, length: int, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """A training mask (B, N), True = masked: per row r ~ U(0, 1) and mask_counts(r) positions chosen uniformly."""
    device = torch.device(device)
    counts = mask_counts(torch.rand(batch, generator=generator, device=device), length)
    return random_ranks(batch, length, generator, device) < counts[:, None]


def add_code_noise(codes: Tensor, max_fraction: float, codebook_size: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """Replace each code by a uniform random one with probability p ~ U(0, max_fraction), one p per example."""
    _check_fraction("max_fraction", max_fraction)
    shape = (codes.shape[0],) + (1,) * (codes.ndim - 1)
    p = torch.rand(shape, generator=generator, device=codes.device) * max_fraction
    replace = torch.rand(codes.shape, generator=generator, device=codes.device) < p
    noise = torch.randint(codebook_size, codes.shape, generator=generator, device=codes.device, dtype=codes.dtype)
    return torch.where(replace, noise, codes)


def sample_drop(batch: int, p: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """Which examples (B,) drop a condition: independently with probability p."""
    _check_fraction("drop probability", p)
    return torch.rand(batch, generator=generator, device=torch.device(device)) < p


def masked_cross_entropy(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Cross-entropy summed over the K sub-tokens, averaged over masked positions: logits (B, N, K, V), targets
    (B, N, K), masked (B, N)."""
    if not masked.any():
        raise ValueError("masked: no masked position to take the loss on")
    picked = logits[masked].float()
    return F.cross_entropy(picked.flatten(0, 1), targets[masked].flatten(), reduction="sum") / picked.shape[0]


@dataclass(frozen=True)
class MaskingConfig:
    lr_noise: float = 0.1  # the largest fraction of low-res codes replaced by random codes
    lr_drop: float = 0.1  # probability that an example trains without its low-res input
    text_drop: float = 0.1  # probability that an example trains without its text

    def __post_init__(self):
        for name in ("lr_noise", "lr_drop", "text_drop"):
            _check_fraction(f"MaskingConfig.{name}", getattr(self, name))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def decode_schedule(length: int, steps: int) -> list[int]:
    """How many of `length` positions stay masked after each of `steps` decoding steps: floor(N cos(pi/2 s / S)),
    strictly decreasing to 0 so that every step commits at least one position."""
    if not 1 <= steps <= length:
        raise ValueError(f"steps: {steps} decoding steps for {length} positions; need 1 <= steps <= positions")
    remaining, previous = [], length
    for s in range(1, steps + 1):
        n = min(math.floor(length * math.cos(math.pi / 2 * s / steps)), previous - 1)
        previous = max(n, steps - s)  # leaves at least one position for each later step
        remaining.append(previous)
    return remaining


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample every sub-token (Gumbel-max; temperature 0 = argmax) -> (tokens (B, N, K), log-prob per position)."""
    logits = logits.float()
    if temperature > 0:
        tokens = (logits / temperature + gumbel(logits.shape, generator, logits.device)).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    log_prob = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    return tokens, log_prob


@torch.no_grad()
def parallel_decode(predict: Predictor, batch: int, length: int, factors: int, *, steps: int,
                    temperature: float = 1.0, choice_temperature: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Iterative parallel decoding of (B, N, K) tokens in exactly `steps` calls of `predict`."""
    if temperature < 0 or choice_temperature < 0:
        raise ValueError(f"temperatures must be >= 0, got temperature={temperature}, "
                         f"choice_temperature={choice_temperature}")
    device = torch.device(device)
    tokens = torch.zeros(batch, length, factors, dtype=torch.long, device=device)
    masked = torch.ones(batch, length, dtype=torch.bool, device=device)
    for step, remaining in enumerate(decode_schedule(length, steps), start=1):
        sampled, log_prob = sample_tokens(predict(tokens, masked), temperature, generator)
        tokens = torch.where(masked[..., None], sampled, tokens)
        noise = choice_temperature * (1 - step / steps)
        confidence = log_prob + noise * gumbel(log_prob.shape, generator, device) if noise > 0 else log_prob
        confidence = confidence.masked_fill(~masked, math.inf)
        rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        masked = rank >= length - remaining
    return tokens


def guidance_weights(text_scale: float, lr_scale: float, has_text: bool = True) -> dict[Condition, float]:
    """The weight of each forward pass in the guided logits (see the module docstring); zero weights left out."""
    weights = {(True, True): text_scale, (True, False): lr_scale - text_scale, (False, False): 1.0 - lr_scale}
    if not has_text:
        weights[(True, False)] += weights.pop((True, True))
    return {condition: w for condition, w in weights.items() if w != 0}


@dataclass(frozen=True)
class DecodingConfig:
    steps: int = 24  # parallel-decoding steps per stage (paper: 24)
    text_guidance: float = 4.0  # s_text
    lr_guidance: float = 1.0  # s_lr
    temperature: float = 1.0  # sub-token sampling temperature; 0 = argmax
    choice_temperature: float = 4.5  # Gumbel noise on confidences at the first step, annealed to 0 (MaskGIT)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"DecodingConfig.steps must be >= 1, got {self.steps}")
        if self.temperature < 0 or self.choice_temperature < 0:
            raise ValueError("DecodingConfig: temperature and choice_temperature must be >= 0")
