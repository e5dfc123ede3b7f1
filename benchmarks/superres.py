"""Super-resolution attention cost: one block (three layers) at 1x, 2x and 4x the token count, windowed vs full.

The grid grows along w: (t, h, w), (t, h, 2w), (t, h, 4w). The windowed block uses the demo flavor's window shapes
(vertical (1, h, 4), horizontal (1, 4, 16), temporal (t, 4, 4)); the full block is the same code with each window the
size of the grid, so both self-attend and cross-attend to the low-res grid and the text in the same layers and only
the window differs. Time: forward + backward of the block on random activations, best of `--rounds` (the rounds
interleave the cases). Memory: bytes of the activations the block saves for backward (saved-tensor hooks, parameters
excluded), the training memory that grows with tokens; CPU PyTorch has no allocator peak counter. The exponent is the
least-squares slope of log cost over log tokens: about 1 for linear cost, 2 for quadratic. The last line printed is
one JSON object with the figures; `ratio` = full time / windowed time at 4x.

Torch runs on `--threads` threads (1 by default): on a shared CPU, spinning intra-op threads make timings noise.

    python benchmarks/superres.py [--rounds 5] [--grid 4 16 16] [--width 64] [--heads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import torch

from pipeline.superres import SPATIAL_SCALE, Block, LayerMasks, text_mask

SCALES = (1, 2, 4)


def windows_for(grid: tuple[int, int, int]) -> tuple[tuple[int, int, int], ...]:
    t, h, _ = grid
    return (1, h, 4), (1, 4, 16), (t, 4, 4)


def inputs(grid: tuple[int, int, int], width: int, text_len: int) -> tuple:
    g = torch.Generator().manual_seed(0)
    t, h, w = grid
    x = torch.randn(1, t, h, w, width, generator=g, requires_grad=True)
    lr = torch.randn(1, t, h // SPATIAL_SCALE, w // SPATIAL_SCALE, width, generator=g)
    text = torch.randn(1, text_len, width, generator=g)
    masks = [LayerMasks(None, None, text_mask("sdpa", math.prod(grid), torch.ones(1, text_len, dtype=torch.bool)))] * 3
    return x, lr, text, masks


def step(block: Block, args: tuple) -> None:
    block(*args).square().mean().backward()


def activation_bytes(block: Block, args: tuple) -> int:
    """Bytes of the distinct non-parameter storages that autograd saves for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(*args)
    del out
    return sum(seen.values())


def slope(tokens: list[int], costs: list[float]) -> float:
    xs, ys = [math.log(n) for n in tokens], [math.log(c) for c in costs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure(base: tuple[int, int, int], width: int, heads: int, rounds: int) -> dict[str, dict[str, list]]:
    """Per kind: tokens, best seconds and saved-activation MiB at each scale. Rounds visit every case in turn, so
    drift in the machine's load hits all of them alike."""
    cases = []
    for kind in ("windowed", "full"):
        for scale in SCALES:
            grid = (base[0], base[1], base[2] * scale)
            torch.manual_seed(0)
            block = Block(width, heads, 4, windows_for(grid) if kind == "windowed" else (grid,) * 3)
            args = inputs(grid, width, text_len=8)
            step(block, args)  # warm-up
            cases.append((kind, grid, block, args))
    seconds = [math.inf] * len(cases)
    for _ in range(rounds):
        for i, (_, _, block, args) in enumerate(cases):
            start = time.perf_counter()
            step(block, args)
            seconds[i] = min(seconds[i], time.perf_counter() - start)
    runs: dict[str, dict[str, list]] = {kind: {"tokens": [], "seconds": [], "activation_mb": []}
                                        for kind in ("windowed", "full")}
    for (kind, grid, block, args), best in zip(cases, seconds):
        mib = activation_bytes(block, args) / 2**20
        runs[kind]["tokens"].append(math.prod(grid))
        runs[kind]["seconds"].append(best)
        runs[kind]["activation_mb"].append(mib)
        print(f"{kind:9s} grid {grid}: {math.prod(grid):6d} tokens  {best * 1e3:9.1f} ms  "
              f"{mib:8.1f} MiB saved activations", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("T", "H", "W"),
                        help="the 1x high-res token grid; w grows 2x and 4x")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    base = tuple(args.grid)
    for window in windows_for((base[0], base[1], base[2] * SCALES[0])):
        if any(g % n for g, n in zip(base, window)):
            parser.error(f"--grid {base}: the windows {windows_for(base)} must tile it")
    torch.set_num_threads(args.threads)
    runs = measure(base, args.width, args.heads, args.rounds)
    result = {
        "windowed_exponent": round(slope(runs["windowed"]["tokens"], runs["windowed"]["seconds"]), 2),
        "full_exponent": round(slope(runs["full"]["tokens"], runs["full"]["seconds"]), 2),
        "ratio": round(runs["full"]["seconds"][-1] / runs["windowed"]["seconds"][-1], 2),
        "windowed_memory_exponent": round(slope(runs["windowed"]["tokens"], runs["windowed"]["activation_mb"]), 2),
        "full_memory_exponent": round(slope(runs["full"]["tokens"], runs["full"]["activation_mb"]), 2),
        "tokens": runs["windowed"]["tokens"],
        "windowed_ms": [round(s * 1e3, 1) for s in runs["windowed"]["seconds"]],
        "full_ms": [round(s * 1e3, 1) for s in runs["full"]["seconds"]],
        "windowed_activation_mb": [round(m, 1) for m in runs["windowed"]["activation_mb"]],
        "full_activation_mb": [round(m, 1) for m in runs["full"]["activation_mb"]],
        "grid": list(base), "width": args.width, "heads": args.heads, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.machine(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
