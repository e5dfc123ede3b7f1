"""Planning a tokenize job at corpus scale: seconds and the driver's peak resident memory against manifest rows.

A Parquet manifest of realistic rows (Panda-70M-like S3 paths `s3://<bucket>/videos/<NNNNN>/<11-char id>_<clip>.mp4`,
captions of 8-24 words, a split column) is written once per size, then each size is planned in a fresh process by
the job's own planning code, `TokenizeJob.plan` (what `videopoet tokenize` runs before any work: the manifest
streamed, sorted in runs of `plan_memory_mb` spilled to local disk, merged, the ids written to OUT and the work
parts to local disk). Peak RSS is the process's high-water mark (`ru_maxrss`), imports (torch, Ray) included; the
baseline is its RSS just before planning. The last line printed is one JSON object.

    python benchmarks/plan_scale.py [--rows 1000000 4000000 10000000] [--plan-memory-mb 256] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 200_000
WORDS = ("a person man woman dog cat car street city beach water sky tree house room table hand face camera "
         "walking running talking sitting standing holding looking moving driving playing cooking dancing "
         "red blue green white black small large old young slowly quickly outside inside near front behind "
         "the of on in with and while at his her their into from").split()


def write_manifest(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` manifest rows in Parquet, generated a batch at a time."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    words = np.array(WORDS)
    with pq.ParquetWriter(path, pa.schema([("path", pa.string()), ("caption", pa.string()),
                                           ("split", pa.string())])) as writer:
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            videos = ["".join(chars) for chars in alphabet[rng.integers(0, len(alphabet), (n, 11))]]
            clips = rng.integers(0, 40, n)
            paths = [f"s3://panda70m/videos/{(start + i) // 10000:05d}/{v}_{c:03d}.mp4"
                     for i, (v, c) in enumerate(zip(videos, clips))]
            lengths = rng.integers(8, 25, n)
            captions = [" ".join(words[rng.integers(0, len(words), k)]) for k in lengths]
            split = np.where(rng.random(n) < 0.99, "train", "val")
            writer.write_table(pa.table({"path": paths, "caption": captions, "split": split.tolist()}))


def child(manifest: str, out: str, video: str, plan_memory_mb: int) -> None:
    """Plan `manifest` as the job does, in this process; prints one JSON line."""
    import psutil

    from pipeline.config import load_config
    from tokenize_jobs.job import TokenizeConfig, TokenizeJob

    cfg = load_config(TokenizeConfig, "paper", [f"plan_memory_mb={plan_memory_mb}"], kind="tokenize")
    job = TokenizeJob(cfg, manifest, out, video)
    baseline = psutil.Process().memory_info().rss
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as folder:
        began = time.perf_counter()
        plan = job.plan(folder)
        seconds = time.perf_counter() - began
        spilled = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rows": plan.inputs, "shards": plan.generations[0].shards, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(peak / 2**20), "baseline_rss_mb": round(baseline / 2**20),
                      "work_parts_mb": round(spilled / 2**20)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 10_000_000])
    parser.add_argument("--plan-memory-mb", type=int, default=256)
    parser.add_argument("--work", help="folder for the manifests (kept, reused) and OUT; default: a temporary one")
    parser.add_argument("--child", nargs=3, metavar=("MANIFEST", "OUT", "VIDEO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.plan_memory_mb)
        return

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import load_config
    from pipeline.magvit import MagvitConfig, MagvitModel

    work = Path(args.work or tempfile.mkdtemp(prefix="plan-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(work / "video", MagvitModel(video), video)
    results = []
    for rows in args.rows:
        manifest = work / f"manifest-{rows}.parquet"
        if not manifest.exists():
            began = time.perf_counter()
            write_manifest(manifest, rows)
            print(f"wrote {manifest} ({manifest.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - began:.0f} s",
                  flush=True)
        out = work / f"out-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        line = subprocess.run([sys.executable, __file__, "--plan-memory-mb", str(args.plan_memory_mb), "--child",
                               str(manifest), str(out), str(work / "video")], check=True, capture_output=True,
                              text=True, cwd=ROOT).stdout.strip().splitlines()[-1]
        result = json.loads(line)
        results.append(result)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{result['rows']:>11,} rows  {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mb']:6,} MB "
              f"(before planning {result['baseline_rss_mb']:,} MB)  work parts {result['work_parts_mb']:,} MB",
              flush=True)
    print(json.dumps({"benchmark": "plan_scale", "plan_memory_mb": args.plan_memory_mb, "results": results,
                      "machine": platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
