"""The tokenize job on a multi-node Ray cluster that loses a node mid-run: what happens, and how long recovery takes.

A `ray.cluster_utils.Cluster` on this machine (as Ray's own elastic tests do): a head with 0 CPUs, where the job's
driver runs, and `--workers` worker nodes of 1 CPU each. The job (`python -m tokenize_jobs.job`, RAY_ADDRESS set)
starts; once its first shard is written, the worker node running the video tokenizer actor is removed without
warning (its raylet and every worker process on it killed), then, in scenario `replace`, a fresh 1-CPU node joins
2 s later (scenario `shrink`: none joins). If the job exits non-zero, the same command runs again. `--baseline` first
runs the same job uninterrupted on the same cluster, into OUT-baseline.

The cluster keeps its files and its address under a private RAY_TMPDIR, so no other Ray on the machine finds it.
Prints one JSON object: the scenario, the shards written when the node was removed, whether the job finished by
itself, the seconds from the removal to the end, the job's total and the baseline's.

    python benchmarks/multinode.py --manifest M --out OUT --video-tokenizer V [--audio-tokenizer A]
        [--scenario replace|shrink] [--workers 2] [--config debug] [--inputs-per-shard 1] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def actor_node(nodes, name: str):
    """The node whose raylet started the actor process `name` (Ray titles actor processes `ray::<class>`)."""
    for node in nodes:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for child in raylet.children(recursive=True):
            try:
                if name in " ".join(child.cmdline()):
                    return node
            except psutil.NoSuchProcess:
                continue
    return None


def run_job(args: list[str], env: dict[str, str], log: Path, on_first_shard=None, shard_dir: Path | None = None):
    """Run the job to its end; `on_first_shard()` is called once a shard file exists. Returns (rc, seconds)."""
    began = time.perf_counter()
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tokenize_jobs.job", *args], stdout=f, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT, start_new_session=True)
    try:
        if on_first_shard is not None:
            while proc.poll() is None and not list(shard_dir.glob("*/shard-*.parquet")):
                time.sleep(0.05)
            if proc.poll() is None:
                on_first_shard()
        rc = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--video-tokenizer", required=True)
    parser.add_argument("--audio-tokenizer")
    parser.add_argument("--scenario", choices=["replace", "shrink"], default="replace")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default="debug")
    parser.add_argument("--inputs-per-shard", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help="first run the job uninterrupted, into OUT-baseline")
    args = parser.parse_args()

    private = tempfile.mkdtemp(prefix="vp-cluster-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = private
    from ray.cluster_utils import Cluster

    out = Path(args.out)
    job = ["--manifest", args.manifest, "--video-tokenizer", args.video_tokenizer, "--config", args.config,
           "--inputs-per-shard", str(args.inputs_per_shard)]
    job += ["--audio-tokenizer", args.audio_tokenizer] if args.audio_tokenizer else []
    log = out.parent / f"{out.name}.log"
    result: dict = {"scenario": args.scenario, "workers": args.workers}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(args.workers)]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        if args.baseline:
            rc, result["baseline_s"] = run_job([*job, "--out", f"{out}-baseline"], env, log)
            assert rc == 0, f"the uninterrupted run failed: see {log}"
        removed = {}

        def remove() -> None:
            node = actor_node(workers, "VideoTokenizer") or workers[0]
            result["shards_at_removal"] = len(list(out.glob("*/shard-*.parquet")))
            cluster.remove_node(node, allow_graceful=False)
            removed["at"] = time.perf_counter()
            if args.scenario == "replace":
                time.sleep(2)
                cluster.add_node(num_cpus=1)

        rc, result["total_s"] = run_job([*job, "--out", str(out)], env, log, remove, out)
        result["finished_by_itself"] = rc == 0
        if rc != 0:
            result["first_rc"] = rc
            rc, result["rerun_s"] = run_job([*job, "--out", str(out)], env, log)
        result["rc"] = rc
        result["seconds_after_removal"] = round(time.perf_counter() - removed["at"], 1) if removed else None
    finally:
        cluster.shutdown()
        shutil.rmtree(private, ignore_errors=True)
    for key in ("baseline_s", "total_s", "rerun_s"):
        if key in result:
            result[key] = round(result[key], 1)
    print(json.dumps(result), flush=True)
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
