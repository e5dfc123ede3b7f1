"""Tokenizer speed: encode and decode clips/s of MAGVIT-v2 and SoundStream per flavor, and achieved FLOP/s.

Each flavor is built with random weights (speed does not depend on them) and run on a batch of its training clip:
17 frames at the flavor's frame size (debug and demo 32x32, paper 128x128) for video, 2.125 s at 16 kHz for audio.
FLOPs per clip are counted by `torch.utils.flop_counter.FlopCounterMode` over one encode and one decode (convolutions
and matmuls, 2 FLOPs per multiply-add); achieved FLOP/s is that count over the measured time, and `utilization` is it
over the device's matmul peak measured in the same run and dtype (`train.flops.matmul_peak_flops`, 1024^3 matmuls on
the CPU, 8192^3 on a GPU): float32 on the CPU, bf16 autocast on a GPU. The headline `ratio` is the utilization of the
largest video flavor run (encode + decode).

On the CPU torch runs on `--threads` threads (default: all); the paper flavor is slow there (seconds per clip), so
the default flavors are debug and demo on a CPU and all three on a GPU.

    python benchmarks/tokenizer.py [--flavors debug,demo,paper] [--device cpu|cuda] [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_config
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from train.flops import matmul_peak_flops

FRAMES, AUDIO_SAMPLES = 17, 34_000
FRAME_SIZE = {"debug": 32, "demo": 32, "paper": 128}


def inputs(modality: str, flavor: str, batch: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if modality == "video":
        size = FRAME_SIZE[flavor]
        x = torch.rand(batch, 3, FRAMES, size, size, generator=generator) * 2 - 1
    else:
        x = (torch.rand(batch, AUDIO_SAMPLES, generator=generator) * 2 - 1) * 0.5
    return x.to(device)


def build(modality: str, flavor: str, device: torch.device) -> torch.nn.Module:
    if modality == "video":
        return MagvitModel(load_config(MagvitConfig, flavor, kind="video_tokenizer")).to(device).eval()
    return SoundStreamModel(load_config(SoundStreamConfig, flavor, kind="audio_tokenizer")).to(device).eval()


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn, rounds: int, device: torch.device) -> float:
    fn()  # warm-up: allocator growth, kernel selection
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@torch.no_grad()
def measure(modality: str, flavor: str, batch: int, rounds: int, device: torch.device, peak: float) -> dict:
    model = build(modality, flavor, device)
    x = inputs(modality, flavor, batch, device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        codes = model.encode(x)
        encode = lambda: model.encode(x)  # noqa: E731
        decode = lambda: model.decode(codes)  # noqa: E731
        flops = {"encode": counted_flops(encode), "decode": counted_flops(decode)}
        seconds = {"encode": median_seconds(encode, rounds, device), "decode": median_seconds(decode, rounds, device)}
    result = {"parameters": sum(p.numel() for p in model.parameters()), "codes_per_clip": codes[0].numel()}
    for step in ("encode", "decode"):
        result[f"{step}_clips_per_s"] = batch / seconds[step]
        result[f"{step}_gflop_per_clip"] = flops[step] / batch / 1e9
        result[f"{step}_tflops"] = flops[step] / seconds[step] / 1e12
    total = (flops["encode"] + flops["decode"]) / (seconds["encode"] + seconds["decode"])
    result["tflops"] = total / 1e12
    result["utilization"] = total / peak
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--flavors", default=None, help="comma-separated (default: debug,demo on CPU, + paper on GPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    unknown = set((args.flavors or "").split(",")) - set(FRAME_SIZE) - {""}
    if unknown:
        parser.error(f"--flavors: unknown {sorted(unknown)} (known: {', '.join(FRAME_SIZE)})")
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be >= 1")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    flavors = (args.flavors or ("debug,demo,paper" if device.type == "cuda" else "debug,demo")).split(",")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, dtype)

    results = {}
    for modality in ("video", "audio"):
        for flavor in flavors:
            r = measure(modality, flavor, args.batch, args.rounds, device, peak)
            results[f"{modality}/{flavor}"] = r
            print(f"{modality:5} {flavor:6} {r['parameters'] / 1e6:7.2f}M params  "
                  f"encode {r['encode_clips_per_s']:8.2f} clips/s ({r['encode_gflop_per_clip']:.2f} GFLOP/clip)  "
                  f"decode {r['decode_clips_per_s']:8.2f} clips/s ({r['decode_gflop_per_clip']:.2f} GFLOP/clip)  "
                  f"{r['tflops'] * 1e3:.1f} GFLOP/s "
                  f"= {r['utilization']:.1%} of peak", flush=True)
    largest = f"video/{flavors[-1]}"
    print(json.dumps({
        "benchmark": "tokenizer", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch, "matmul_peak_tflops": peak / 1e12, "results": results,
        "ratio": results[largest]["utilization"], "ratio_of": f"{largest} achieved FLOP/s / matmul peak"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
