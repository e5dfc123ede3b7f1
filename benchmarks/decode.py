"""Decode throughput: `iter_clips` against a bare ffmpeg doing the same video work.

For every corpus file that decodes cleanly, each round times (a) `iter_clips` with the given config, audio
included, (b) the same with audio off, and (c) ffmpeg alone running our exact video command line
(`-i F -filter_complex <fps, scale, crop> -f rawvideo -pix_fmt rgb24 pipe:1`), its stdout read and discarded.
Runs are interleaved and the order rotates each round, so drift in machine load hits all three alike; each
file keeps its best of `--rounds`. Throughput is output frames (8 fps frames ffmpeg emits) per second.
The last line printed is one JSON object with the figures; `ratio` = ours (with audio) / bare.

    python benchmarks/decode.py [--rounds 3] [--height 128] [--width 128] [FILE...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import replace
from pipeline.media import MediaConfig, decode, decode_command, iter_clips
from pipeline.probe import probe

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"


def time_ours(path: str, cfg: MediaConfig) -> float:
    start = time.perf_counter()
    for _ in iter_clips(path, cfg):
        pass
    return time.perf_counter() - start


def time_bare(path: str, cfg: MediaConfig) -> tuple[float, int]:
    """Seconds, and frames written, for ffmpeg alone with our video command line."""
    cmd = decode_command(path, probe(path), cfg)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    proc.wait()
    return time.perf_counter() - start, size // (cfg.height * cfg.width * 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"media files (default: every file in {CORPUS} that decodes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    cfg = MediaConfig(height=args.height, width=args.width)
    silent = replace(cfg, audio=False)
    candidates = args.files or sorted(str(p) for p in CORPUS.iterdir() if p.is_file())
    files = [f for f in candidates if (r := decode(f, cfg)).ok and r.clips]  # also warms the page cache
    if not files:
        print(f"no decodable files among {candidates}", file=sys.stderr)
        return 1

    runs = {
        "ours": lambda f: time_ours(f, cfg),
        "ours_video_only": lambda f: time_ours(f, silent),
        "bare": lambda f: time_bare(f, silent)[0],
    }
    best = {name: {f: float("inf") for f in files} for name in runs}
    frames = {f: time_bare(f, silent)[1] for f in files}
    for round_ in range(args.rounds):
        order = list(runs)[round_ % len(runs):] + list(runs)[:round_ % len(runs)]
        for f in files:
            for name in order:
                best[name][f] = min(best[name][f], runs[name](f))

    print(f"{'file':32s} {'frames':>6s} " + " ".join(f"{name + ' f/s':>20s}" for name in runs))
    for f in files:
        print(f"{Path(f).name:32s} {frames[f]:6d} "
              + " ".join(f"{frames[f] / best[name][f]:20.0f}" for name in runs))
    total_frames = sum(frames.values())
    fps = {name: total_frames / sum(best[name].values()) for name in runs}
    print(f"{'total':32s} {total_frames:6d} " + " ".join(f"{fps[name]:20.0f}" for name in runs))
    print(json.dumps({
        "benchmark": "decode", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "size": [cfg.height, cfg.width], "fps": cfg.fps,
        "files": len(files), "frames": total_frames, "rounds": args.rounds,
        "ours_fps": round(fps["ours"], 1), "ours_video_only_fps": round(fps["ours_video_only"], 1),
        "bare_fps": round(fps["bare"], 1), "ratio": round(fps["ours"] / fps["bare"], 3),
        "ratio_video_only": round(fps["ours_video_only"] / fps["bare"], 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
