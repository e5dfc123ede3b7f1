"""MFU's two halves: the model's FLOPs per token against torch's FLOP counter, and the measured peak."""

from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.vocab import Vocabulary
from train.flops import MatmulPeak, matmul_peak_flops, transformer_flops_per_token

CFG = LLMConfig(vocab=Vocabulary(video_codes=64, audio_levels=2, audio_codes=16, text_size=8), width=32, depth=2,
                heads=2, mlp_width=48, text_width=0, attention="sdpa")


def test_matmul_flops_per_token_match_torch_counter():
    """The formula's matmul part is what FlopCounterMode counts over a real loss forward and backward (every position
    a target, so the head runs on every token); the counter does not see CPU attention kernels, checked apart."""
    model = VideoPoetLM(CFG)
    batch, length = 2, 33
    ids = torch.randint(0, CFG.vocab.size, (batch, length), generator=torch.Generator().manual_seed(0))
    targets = torch.ones(batch, length, dtype=torch.bool)
    targets[:, 0] = False
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.loss(ids, 4, targets)
        loss.backward()
    assert counter.get_total_flops() == batch * (length - 1) * transformer_flops_per_token(CFG, 0)


def test_attention_flops_per_token_match_torch_counter():
    """Scores and values of full attention, forward and backward, in explicit matmuls: 12 x width x length a token
    per layer, as the formula adds."""
    length, heads, head_dim = 24, CFG.heads, CFG.width // CFG.heads
    q, k, v = (torch.randn(heads, length, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        (torch.softmax(q @ k.transpose(1, 2), -1) @ v).sum().backward()
    one_layer = replace(CFG, depth=1)
    per_layer = transformer_flops_per_token(one_layer, length) - transformer_flops_per_token(one_layer, 0)
    assert counter.get_total_flops() == length * per_layer


def test_peak_keeps_the_best_measurement():
    """A peak read while other processes held the cores (here: set to 1 FLOP/s) does not stand past the next
    report; a reading never goes down."""
    device = torch.device("cpu")
    assert matmul_peak_flops(device, torch.float32, size=64, seconds=0) > 0  # at least one matmul, even with no time
    peak = MatmulPeak(device, torch.float32, seconds=0.05)
    measured = peak.flops
    peak.flops = 1.0
    assert peak.update() > 1e6
    best = peak.flops
    assert peak.update(seconds=0) >= best and measured > 1e6
