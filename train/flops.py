"""FLOPs accounting for MFU: the model's FLOPs per training batch, and the device's measured matmul peak.

MFU = achieved FLOP/s / peak FLOP/s. The peak is measured (a large square matmul on the device, in the training
dtype), not read from a spec sheet, so the figure means the same on a CPU, an H100 or an H200.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import torch

from pipeline.llm import LLMConfig


def attention_flops(cfg: LLMConfig, positions: np.ndarray) -> float:
    """Forward + backward FLOPs of attention scores and values over sequences of `positions` positions each: 2
    matmuls of width x length per position and layer, x 3 for forward and backward, x 2 FLOPs per multiply-add."""
    positions = np.asarray(positions, np.float64)
    return float(np.sum(12 * cfg.depth * cfg.width * positions**2))


def sequence_flops(cfg: LLMConfig, positions: np.ndarray, targets: np.ndarray) -> float:
    """Forward + backward FLOPs of sequences with `positions` forward positions and `targets` loss positions each:
    6 x the blocks' matmul parameters per position, 6 x the output head's per target (the loss runs the head on the
    targets only: a video-to-audio sequence's 192-code prefix costs no head), and attention."""
    positions, targets = np.asarray(positions, np.float64), np.asarray(targets, np.float64)
    blocks = cfg.depth * (4 * cfg.width * cfg.width + 3 * cfg.width * cfg.mlp_width)
    head = cfg.width * cfg.vocab.size
    return float(np.sum(6 * blocks * positions + 6 * head * targets)) + attention_flops(cfg, positions)


def batch_flops(cfg: LLMConfig, batch: Mapping[str, np.ndarray]) -> float:
    """`sequence_flops` of a collated batch (`train.mixture.collate`): the last token of a sequence predicts nothing
    and is left out of the forward."""
    return sequence_flops(cfg, batch["lengths"] - 1, batch["loss_mask"].sum(1))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, size: int | None = None
                      ) -> float:
    """Best FLOP/s of repeated square matmuls on `device` in `dtype`, over `seconds` (at least one burst): 1024^3 on
    the CPU, 8192^3 on a GPU timed in bursts of 8 between synchronizations. A small GPU matmul takes tens of
    microseconds, and a synchronize after each would be a sizeable part of the time (understating the peak and
    overstating MFU)."""
    cuda = device.type == "cuda"
    size, burst = (size or 8192, 8) if cuda else (size or 1024, 1)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while best == 0.0 or time.perf_counter() < deadline:
        began = time.perf_counter()
        for _ in range(burst):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = max(best, burst * 2 * size**3 / (time.perf_counter() - began))
    return best


class MatmulPeak:
    """The device's matmul peak for a training run's MFU: the best rate measured in the run, at its start and again
    briefly at every report. One measurement can land while other processes hold the cores (Ray's at the start of a
    run: a peak read at a third of the device's rate made MFU 109%), and the best over the run does not keep it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seconds: float = 0.5):
        self.device, self.dtype = device, dtype
        self.flops = matmul_peak_flops(device, dtype, seconds=seconds)

    def update(self, seconds: float = 0.02) -> float:
        """Measure again for `seconds` (a few matmuls: well under 1% of a report interval); the best so far."""
        self.flops = max(self.flops, matmul_peak_flops(self.device, self.dtype, seconds=seconds))
        return self.flops
