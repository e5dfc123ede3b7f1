"""Attention kernels: FlexAttention with BlockMasks against SDPA, for the LLM's prefix-LM mask and super-resolution's
windows, and windowed against full attention.

LLM: one attention op over (batch, heads, T, head_dim) under the prefix-LM mask (`pipeline.llm.prefix_lm_rule`, a
bidirectional prefix of `--prefix` positions, causal after it): SDPA with the dense boolean mask (the model's `sdpa`
path) against compiled FlexAttention with the BlockMask (its `flex` path), the masks built beforehand (the model builds
one per forward and shares it across blocks; their build times are printed apart).

Super-resolution: the self-attention of one layer per window shape of a block on a `--grid` token grid (demo windows
scaled to it: vertical (1, h, 4), horizontal (1, 4, 16), temporal (t, 4, 4)), summed over the three: SDPA over
the windows as batch rows (the `sdpa` path), compiled FlexAttention over each sample's windows side by side under the
block-diagonal BlockMask (the `flex` path), and SDPA over the whole grid (full attention, no window).
Also printed, without timing: how many attention scores the flex path's 128-token blocks evaluate on the paper's
stage-1 grid (5, 56, 32) relative to the batched windows, per paper window (self- and low-res cross-attention).

Timed: forward + backward on CUDA; forward only on the CPU, where PyTorch has no compiled FlexAttention backward (the
model uses SDPA there). Best of `--rounds`, rounds interleaving the cases. Compilation happens in warm-up, untimed.
The last line printed is one JSON object; `ratio` = LLM SDPA time / LLM FlexAttention time (> 1: flex is faster).

Torch runs on `--threads` threads on the CPU (1 by default: on a shared CPU spinning intra-op threads make noise).

    python benchmarks/attention.py [--device cpu|cuda] [--rounds 5] [--length 1024] [--prefix 320] [--grid 5 16 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from pipeline.llm import prefix_lm_mask, prefix_lm_rule
from pipeline.superres import lowres_window, same_window

PAPER_GRID = (5, 56, 32)
PAPER_WINDOWS = ((1, 56, 4), (1, 8, 32), (5, 8, 8))
BLOCK = 128  # FlexAttention's default block size


def windows_for(grid: tuple[int, int, int]) -> tuple[tuple[int, int, int], ...]:
    t, h, _ = grid
    return (1, h, 4), (1, 4, 16), (t, 4, 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    began = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - began


def pass_of(attend: Callable[..., torch.Tensor], qkv: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    def run() -> None:
        if backward:
            attend(*qkv).sum().backward()
        else:
            with torch.no_grad():
                attend(*qkv)

    return run


def random_qkv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, grad: bool, seed: int
               ) -> list[torch.Tensor]:
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def score_overhead(grid: tuple[int, int, int], windows: tuple[tuple[int, int, int], ...]) -> list[dict[str, float]]:
    """Scores the flex path's blocks evaluate / scores of the batched windows, per window (no timing)."""
    n = math.prod(grid)
    rows = []
    for window in windows:
        size, lr_size = math.prod(window), math.prod(lowres_window(window))
        row = {"window": list(window)}
        for name, keys, kv_size in (("self", n, size), ("lowres", n // 4, lr_size)):
            mask = create_block_mask(same_window(size, kv_size), None, None, n, keys, device="cpu")
            blocks = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
            row[name] = round(blocks * BLOCK * BLOCK / (n * kv_size), 2)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, else float32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024, help="LLM sequence length")
    parser.add_argument("--prefix", type=int, default=320, help="LLM bidirectional prefix length")
    parser.add_argument("--grid", type=int, nargs=3, default=(5, 16, 16), metavar=("T", "H", "W"),
                        help="super-resolution high-res token grid")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    grid = tuple(args.grid)
    windows = windows_for(grid)
    if any(g % n for window in windows for g, n in zip(grid, window)):
        parser.error(f"--grid {grid}: the windows {windows} must tile it")
    if not 0 < args.prefix <= args.length:
        parser.error("--prefix must lie in [1, --length]")
    torch.set_num_threads(args.threads)
    backward = device.type == "cuda"
    flex = torch.compile(flex_attention)
    b, h, d, length = args.batch, args.heads, args.head_dim, args.length

    # LLM: prefix-LM mask, dense for SDPA, BlockMask for FlexAttention.
    prefix_end = torch.full((b,), args.prefix, device=device)
    start = torch.zeros(b, dtype=torch.long, device=device)
    index = torch.arange(length, device=device)
    dense_build = timed(lambda: prefix_lm_mask(index, length, prefix_end, start), device)
    dense = prefix_lm_mask(index, length, prefix_end, start)
    build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask
    block_mask = build(prefix_lm_rule(prefix_end, start), b, None, length, length, device=device)
    block_build = timed(lambda: build(prefix_lm_rule(prefix_end, start), b, None, length, length, device=device),
                        device)
    qkv = random_qkv((b, h, length, d), dtype, device, backward, seed=0)
    cases = {
        "llm_sdpa": pass_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), qkv, backward),
        "llm_flex": pass_of(lambda q, k, v: flex(q, k, v, block_mask=block_mask), qkv, backward),
    }

    # Super-resolution: the three window shapes' self-attention, as each path runs it, and full attention.
    n = math.prod(grid)
    sr_qkv = random_qkv((b, h, n, d), dtype, device, backward, seed=1)
    window_masks = [create_block_mask(same_window(math.prod(w)), None, None, n, n, device=device) for w in windows]

    def windows_sdpa(q, k, v):
        total = 0
        for window in windows:
            parts = [rearrange(x, "b h (n l) d -> (b n) h l d", l=math.prod(window)) for x in (q, k, v)]
            total = total + F.scaled_dot_product_attention(*parts).sum()
        return total

    def windows_flex(q, k, v):
        return sum(flex(q, k, v, block_mask=mask).sum() for mask in window_masks)

    def full_sdpa(q, k, v):
        return sum(F.scaled_dot_product_attention(q, k, v).sum() for _ in windows)

    cases |= {"sr_windows_sdpa": pass_of(windows_sdpa, sr_qkv, backward),
              "sr_windows_flex": pass_of(windows_flex, sr_qkv, backward),
              "sr_full_sdpa": pass_of(full_sdpa, sr_qkv, backward)}

    for run in cases.values():  # warm-up: compiles FlexAttention for each shape
        run()
    best = dict.fromkeys(cases, math.inf)
    for _ in range(args.rounds):
        for name, run in cases.items():
            best[name] = min(best[name], timed(run, device))
    ms = {name: round(seconds * 1e3, 2) for name, seconds in best.items()}
    passes = "forward + backward" if backward else "forward"
    print(f"{passes}, {device.type}, {dtype}, batch {b}, heads {h}, head_dim {d}")
    print(f"LLM prefix-LM, T={length}, prefix {args.prefix}: SDPA (dense mask) {ms['llm_sdpa']} ms, "
          f"FlexAttention (BlockMask, {block_mask.sparsity():.0f}% of blocks skipped) {ms['llm_flex']} ms; "
          f"mask builds: dense {dense_build * 1e3:.2f} ms, BlockMask {block_build * 1e3:.2f} ms")
    print(f"SR windows {windows} on grid {grid} ({n} tokens): batched windows SDPA {ms['sr_windows_sdpa']} ms, "
          f"FlexAttention side by side {ms['sr_windows_flex']} ms, full attention SDPA {ms['sr_full_sdpa']} ms")
    overhead = score_overhead(PAPER_GRID, PAPER_WINDOWS)
    print(f"paper grid {PAPER_GRID}: scores the flex path evaluates / batched windows' scores: {overhead}")
    result = {
        "ratio": round(best["llm_sdpa"] / best["llm_flex"], 2),
        "sr_flex_over_sdpa": round(best["sr_windows_flex"] / best["sr_windows_sdpa"], 2),
        "sr_full_over_windowed": round(best["sr_full_sdpa"] / best["sr_windows_sdpa"], 2),
        "ms": ms, "llm_mask_build_ms": {"dense": round(dense_build * 1e3, 2), "block": round(block_build * 1e3, 2)},
        "llm_blocks_skipped_percent": round(block_mask.sparsity(), 1),
        "paper_sr_flex_score_overhead": overhead,
        "pass": passes, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "batch": b, "heads": h, "head_dim": d, "length": length, "prefix": args.prefix, "grid": list(grid),
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
