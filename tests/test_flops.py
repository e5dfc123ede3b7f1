"""MFU's two halves: the model's FLOPs per batch against torch's FLOP counter, and the measured peak."""

from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sequence import Task, build_sequence
from pipeline.vocab import Vocabulary
from train.flops import MatmulPeak, attention_flops, batch_flops, matmul_peak_flops, sequence_flops
from train.mixture import collate

CFG = LLMConfig(vocab=Vocabulary(video_codes=64, audio_levels=2, audio_codes=16, text_size=8), width=32, depth=2,
                heads=2, mlp_width=48, text_width=0, attention="sdpa")


def test_matmul_flops_of_a_batch_match_torch_counter():
    """The formula's matmul part is what FlopCounterMode counts over a real loss forward and backward of collated
    sequences of two tasks and lengths (the head runs on the targets only); the counter does not see CPU attention
    kernels, checked apart."""
    model = VideoPoetLM(CFG)
    rng = np.random.default_rng(0)
    batch = collate([build_sequence(Task.TEXT_TO_VIDEO, CFG.vocab, rng.integers(64, size=(2, 2, 2)),
                                    text=rng.integers(8, size=3)),
                     build_sequence(Task.VIDEO_TO_AUDIO, CFG.vocab, rng.integers(64, size=(2, 2, 2)),
                                    audio=rng.integers(16, size=(2, 5)))])
    lengths, targets = batch["lengths"] - 1, batch["loss_mask"].sum(1)
    assert targets[1] < lengths[1] / 2  # the video-to-audio prefix: no head there
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(torch.from_numpy(batch["ids"]), torch.from_numpy(batch["prefix_len"]),
                             torch.from_numpy(batch["loss_mask"] > 0))
        loss.backward()
    # The model runs every sequence at the padded length; the formula counts each at its own.
    padded = np.full_like(lengths, batch["ids"].shape[1] - 1)
    assert counter.get_total_flops() == sequence_flops(CFG, padded, targets) - attention_flops(CFG, padded)
    assert batch_flops(CFG, batch) == sequence_flops(CFG, lengths, targets) < sequence_flops(CFG, padded, targets)


def test_attention_flops_match_torch_counter():
    """Scores and values of full attention, forward and backward, in explicit matmuls: what the formula adds per
    layer."""
    length, heads, head_dim = 24, CFG.heads, CFG.width // CFG.heads
    q, k, v = (torch.randn(heads, length, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        (torch.softmax(q @ k.transpose(1, 2), -1) @ v).sum().backward()
    assert counter.get_total_flops() == attention_flops(replace(CFG, depth=1), [length])


def test_peak_keeps_the_best_measurement():
    """A peak read while other processes held the cores (here: set to 1 FLOP/s) does not stand past the next
    report; a reading never goes down."""
    device = torch.device("cpu")
    assert matmul_peak_flops(device, torch.float32, seconds=0, size=64) > 0  # at least one matmul, even with no time
    peak = MatmulPeak(device, torch.float32, seconds=0.05)
    measured = peak.flops
    peak.flops = 1.0
    assert peak.update() > 1e6
    best = peak.flops
    assert peak.update(seconds=0) >= best and measured > 1e6
