"""Super-resolution attention cost: one block (three layers) at 1x, 2x and 4x the token count, windowed vs full.

The grid grows along w: (t, h, w), (t, h, 2w), (t, h, 4w). The windowed block uses the demo flavor's window shapes
(vertical (1, h, 4), horizontal (1, 4, 16), temporal (t, 4, 4)); the full block is the same code with each window the
size of the grid, so both self-attend and cross-attend to the low-res grid and the text in the same layers and only
the window differs. Time: forward + backward of the block on random activations, best of `--rounds` (the rounds
interleave the cases). Memory: bytes of the activations the block saves for backward (saved-tensor hooks, parameters
excluded), the training memory that grows with tokens (the CPU has no allocator peak counter; on a GPU the block's
peak allocated memory is reported too). The exponent is the
least-squares slope of log cost over log tokens: about 1 for linear cost, 2 for quadratic. The last line printed is
one JSON object with the figures; `ratio` = full time / windowed time at 4x.

Torch runs on `--threads` threads (1 by default): on a shared CPU, spinning intra-op threads make timings noise.
On a GPU (`--device cuda`) the block runs under bf16 autocast, as super-resolution trains there.

    python benchmarks/superres.py [--rounds 5] [--grid 4 16 16] [--width 64] [--heads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
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


def inputs(grid: tuple[int, int, int], width: int, text_len: int, device: torch.device) -> tuple:
    g = torch.Generator().manual_seed(0)
    t, h, w = grid
    x = torch.randn(1, t, h, w, width, generator=g).to(device).requires_grad_()
    lr = torch.randn(1, t, h // SPATIAL_SCALE, w // SPATIAL_SCALE, width, generator=g).to(device)
    text = torch.randn(1, text_len, width, generator=g).to(device)
    keep = torch.ones(1, text_len, dtype=torch.bool, device=device)
    masks = [LayerMasks(None, None, text_mask("sdpa", math.prod(grid), keep))] * 3
    return x, lr, text, masks


def autocast(device: torch.device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def step(block: Block, args: tuple) -> None:
    device = args[0].device
    with autocast(device):
        loss = block(*args).float().square().mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_bytes(block: Block, args: tuple) -> int:
    """Bytes of the distinct non-parameter storages that autograd saves for backward during one forward."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(args[0].device):
        out = block(*args)
    del out
    return sum(seen.values())


def slope(tokens: list[int], costs: list[float]) -> float:
    xs, ys = [math.log(n) for n in tokens], [math.log(c) for c in costs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def peak_step_mib(block: Block, args: tuple) -> float:
    """GPU memory one forward + backward allocates at its peak above what was allocated before it (the other cases'
    blocks and inputs), in MiB."""
    device = args[0].device
    block.zero_grad(set_to_none=True)
    args[0].grad = None
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(block, args)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(base: tuple[int, int, int], width: int, heads: int, rounds: int, device: torch.device
            ) -> dict[str, dict[str, list]]:
    """Per kind: tokens, best seconds and saved-activation MiB at each scale. Rounds visit every case in turn, so
    drift in the machine's load hits all of them alike."""
    cases = []
    for kind in ("windowed", "full"):
        for scale in SCALES:
            grid = (base[0], base[1], base[2] * scale)
            torch.manual_seed(0)
            block = Block(width, heads, 4, windows_for(grid) if kind == "windowed" else (grid,) * 3).to(device)
            args = inputs(grid, width, 8, device)
            step(block, args)  # warm-up
            cases.append((kind, grid, block, args))
    seconds = [math.inf] * len(cases)
    for _ in range(rounds):
        for i, (_, _, block, args) in enumerate(cases):
            start = time.perf_counter()
            step(block, args)
            seconds[i] = min(seconds[i], time.perf_counter() - start)
    runs: dict[str, dict[str, list]] = {kind: {"tokens": [], "seconds": [], "activation_mb": [], "peak_mb": []}
                                        for kind in ("windowed", "full")}
    for (kind, grid, block, args), best in zip(cases, seconds):
        mib = activation_bytes(block, args) / 2**20
        runs[kind]["tokens"].append(math.prod(grid))
        runs[kind]["seconds"].append(best)
        runs[kind]["activation_mb"].append(mib)
        if device.type == "cuda":
            runs[kind]["peak_mb"].append(peak_step_mib(block, args))
            peak = f"  {runs[kind]['peak_mb'][-1]:8.1f} MiB peak"
        else:
            peak = ""
        print(f"{kind:9s} grid {grid}: {math.prod(grid):6d} tokens  {best * 1e3:9.1f} ms  "
              f"{mib:8.1f} MiB saved activations{peak}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(4, 16, 16), metavar=("T", "H", "W"),
                        help="the 1x high-res token grid; w grows 2x and 4x")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    if min(args.grid) < 1 or args.rounds < 1 or args.threads < 1 or args.width % args.heads:
        parser.error("--grid sizes, --rounds and --threads must be >= 1, and --width a multiple of --heads")
    device = torch.device(args.device)
    base = tuple(args.grid)
    for window in windows_for((base[0], base[1], base[2] * SCALES[0])):
        if any(g % n for g, n in zip(base, window)):
            parser.error(f"--grid {base}: the windows {windows_for(base)} must tile it")
    torch.set_num_threads(args.threads)
    runs = measure(base, args.width, args.heads, args.rounds, device)
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
        "windowed_tokens_per_s": round(runs["windowed"]["tokens"][-1] / runs["windowed"]["seconds"][-1]),
        "grid": list(base), "width": args.width, "heads": args.heads, "threads": args.threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "torch": torch.__version__, "machine": platform.machine(),
        "date": datetime.date.today().isoformat(),
    }
    if device.type == "cuda":
        result["windowed_peak_mb"] = [round(m, 1) for m in runs["windowed"]["peak_mb"]]
        result["full_peak_mb"] = [round(m, 1) for m in runs["full"]["peak_mb"]]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
