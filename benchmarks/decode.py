"""Decode throughput: `iter_clips` against a bare ffmpeg doing the same video work.

For every corpus file that decodes cleanly, each round runs (a) `iter_clips` with the given config, audio
included, (b) the same with audio off, (c) a bare ffmpeg with our video filters
(`-v error -i F -filter_complex <fps, scale, crop> -f rawvideo -pix_fmt rgb24 pipe:1`), its stdout read and
discarded, and (d) `probe` alone, for scale: `iter_clips` reads the streams from the stream dump of its own
ffmpeg (a second process only when the first guess, video with audio, was wrong).
Runs are interleaved and their order rotates each round, so drift in machine load hits all alike; each file
keeps its best wall time and its least CPU time (ffmpeg children + this process) over `--rounds`.
Throughput is output frames (what ffmpeg emits at 8 fps) per wall second. The last line printed is one JSON
object with the figures; `ratio` = ours (with audio) / bare, `cpu_ratio` = bare CPU / ours CPU.

    python benchmarks/decode.py [--rounds 5] [--height 128] [--width 128] [FILE...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from pipeline import media
from pipeline.media import MediaConfig, decode, decode_command, iter_clips
from pipeline.probe import probe

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bare_command(path: str, cfg: MediaConfig) -> list[str]:
    """Our video command line, told the file's kind up front and quiet (`-v error`): what one would run by hand."""
    plan = media._plan_for(probe(path), cfg)
    cmd = decode_command(path, cfg, image=plan.image, alpha=plan.alpha, decoder=plan.decoder)
    i = cmd.index("-loglevel")
    return cmd[:i] + ["-v", "error"] + cmd[i + 2:]


def run_bare(cmd: list[str]) -> int:
    """Run ffmpeg, read and discard its stdout; the number of bytes it wrote."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    proc.wait()
    return size


def consume(path: str, cfg: MediaConfig) -> None:
    for _ in iter_clips(path, cfg):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"media files (default: every file in {CORPUS} that decodes)")
    parser.add_argument("--rounds", type=int, default=5)
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
    bare = {f: bare_command(f, silent) for f in files}
    frames = {f: run_bare(bare[f]) // (cfg.height * cfg.width * 3) for f in files}

    runs: dict[str, Callable[[str], object]] = {
        "ours": lambda f: consume(f, cfg),
        "ours_video_only": lambda f: consume(f, silent),
        "bare": lambda f: run_bare(bare[f]),
        "probe": probe,
    }
    wall = {name: {f: float("inf") for f in files} for name in runs}
    cpu = {name: {f: float("inf") for f in files} for name in runs}
    for round_ in range(args.rounds):
        order = list(runs)[round_ % len(runs):] + list(runs)[:round_ % len(runs)]
        for f in files:
            for name in order:
                w, c = measure(lambda: runs[name](f))
                wall[name][f], cpu[name][f] = min(wall[name][f], w), min(cpu[name][f], c)

    rates = ["ours", "ours_video_only", "bare"]
    print(f"{'file':30s} {'frames':>6s} " + " ".join(f"{name + ' f/s':>20s}" for name in rates) + "  probe ms")
    for f in files:
        print(f"{Path(f).name:30s} {frames[f]:6d} " + " ".join(f"{frames[f] / wall[name][f]:20.0f}" for name in rates)
              + f"  {wall['probe'][f] * 1000:8.1f}")
    total_frames = sum(frames.values())
    fps = {name: total_frames / sum(wall[name].values()) for name in rates}
    cpu_s = {name: sum(cpu[name].values()) for name in runs}
    print(f"{'total':30s} {total_frames:6d} " + " ".join(f"{fps[name]:20.0f}" for name in rates)
          + f"  {sum(wall['probe'].values()) * 1000:8.1f}")
    print(f"{'CPU seconds':30s} {'':6s} " + " ".join(f"{cpu_s[name]:20.2f}" for name in rates)
          + f"  {cpu_s['probe'] * 1000:8.1f}")
    print(json.dumps({
        "benchmark": "decode", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "size": [cfg.height, cfg.width], "fps": cfg.fps, "files": len(files), "frames": total_frames,
        "rounds": args.rounds,
        "ours_fps": round(fps["ours"], 1), "ours_video_only_fps": round(fps["ours_video_only"], 1),
        "bare_fps": round(fps["bare"], 1),
        "ratio": round(fps["ours"] / fps["bare"], 3),
        "ratio_video_only": round(fps["ours_video_only"] / fps["bare"], 3),
        "cpu_s": {name: round(v, 3) for name, v in cpu_s.items()},
        "cpu_ratio": round(cpu_s["bare"] / cpu_s["ours"], 3),
        "cpu_ratio_video_only": round(cpu_s["bare"] / cpu_s["ours_video_only"], 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
