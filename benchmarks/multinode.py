"""A job on a multi-node Ray cluster that loses a node mid-run: what happens, and how long recovery takes.

A `ray.cluster_utils.Cluster` on this machine (as Ray's own elastic tests do): a head with 0 CPUs, where the job's
driver and Ray Train's controller run, and `--nodes` worker nodes of 1 CPU each. The job starts (RAY_ADDRESS set)
with the arguments given after `--` and `--out OUT`:

  tokenize      `python -m tokenize_jobs.job`; as soon as the video tokenizer actor has started, the node running it
                is removed (a first-shard trigger raced the end of small corpora on fast machines: their shards
                can all land within one poll);
  llm, sr, video-tokenizer, audio-tokenizer
                `videopoet train APP`; once Ray Train has registered its first checkpoint, a node running a training
                worker is removed. Give the app `--set train.max_failures=1` (or more) to let Ray Train restart the
                worker group, and one node more than its workers, so that Ray Data has a CPU beside them.

The node is removed without warning (its raylet and every worker process on it killed); in scenario `replace` a fresh
1-CPU node joins 2 s later (scenario `shrink`: none joins). If the job exits non-zero, the same command runs again.
`--baseline` first runs the same job uninterrupted on the same cluster, into OUT-baseline.

The cluster keeps its files and its address under a private RAY_TMPDIR, so no other Ray on the machine finds it.
Prints one JSON object: the app and scenario, where the job was when the node went (shards written, or the step of
the registered checkpoint), whether it finished by itself, the step training resumed at and the seconds from the
removal until the replacement workers had restored the checkpoint (`restart_s`), the seconds from the removal to the
end, the job's total and the baseline's.

    python benchmarks/multinode.py --app tokenize --out OUT [--scenario replace|shrink] [--nodes 2] [--baseline]
        -- --manifest M --video-tokenizer V [--audio-tokenizer A] --config debug --inputs-per-shard 1
    python benchmarks/multinode.py --app llm --out OUT --nodes 3 [--baseline]
        -- --data SHARDS --config debug --workers 2 --set train.max_failures=1 --set train.checkpoint_every=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil

ROOT = Path(__file__).resolve().parents[1]
TRAIN_WORKER = "RayTrainWorker"
# app -> (the command before its arguments, its Ray Train run name under OUT/ray; None: the tokenize job)
APPS: dict[str, tuple[list[str], str | None]] = {
    "tokenize": (["-m", "tokenize_jobs.job"], None),
    "llm": (["-m", "train.cli", "llm"], "llm"),
    "sr": (["-m", "train.cli", "sr"], "superres"),
    "video-tokenizer": (["-m", "train.cli", "video-tokenizer"], "video_tokenizer"),
    "audio-tokenizer": (["-m", "train.cli", "audio-tokenizer"], "audio_tokenizer"),
}
RESUMED = re.compile(r"\] resumed at step (\d+)")  # rank 0's line once it has restored a checkpoint (train/engine.py)


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


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart resumes from), or 0."""
    from ray.train import Result

    try:
        result = Result.from_path(run_dir)
    except (RuntimeError, ValueError):  # no run folder or snapshot yet, or a snapshot being rewritten
        return 0
    return result.metrics["step"] if result.checkpoint else 0


def run_job(command: list[str], env: dict[str, str], log: Path,
            events: list[tuple[Callable[[], bool], Callable[[], None]]] = ()) -> tuple[int, float]:
    """Run `command` to its end, firing each (condition, action) of `events` in turn once its condition holds.
    Returns (rc, seconds)."""
    began = time.perf_counter()
    pending = list(events)
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, *command], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        while proc.poll() is None and pending:
            if pending[0][0]():
                pending.pop(0)[1]()
            else:
                time.sleep(0.2)
        rc = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.perf_counter() - began


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", choices=list(APPS), default="tokenize")
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", choices=["replace", "shrink"], default="replace")
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes of 1 CPU each")
    parser.add_argument("--baseline", action="store_true", help="first run the job uninterrupted, into OUT-baseline")
    args = parser.parse_args(argv[:split])
    prefix, run_name = APPS[args.app]
    command = [*prefix, *argv[split + 1:]]

    private = tempfile.mkdtemp(prefix="vp-cluster-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = private
    from ray.cluster_utils import Cluster

    out = Path(args.out)
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"app": args.app, "scenario": args.scenario, "nodes": args.nodes}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(args.nodes)]
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        if args.baseline:
            rc, result["baseline_s"] = run_job([*command, "--out", f"{out}-baseline"], env, log)
            assert rc == 0, f"the uninterrupted run failed: see {log}"
        removed = {}

        def remove(actor: str) -> None:
            node = actor_node(nodes, actor) or nodes[0]
            cluster.remove_node(node, allow_graceful=False)
            removed["at"] = time.perf_counter()
            if run_name is None:
                result["shards_at_removal"] = len(list(out.glob("*/shard-*.parquet")))
            removed["log_offset"] = log.stat().st_size
            if args.scenario == "replace":
                time.sleep(2)
                nodes.append(cluster.add_node(num_cpus=1))

        def resumed() -> bool:
            with open(log, "rb") as f:
                f.seek(removed["log_offset"])
                found = RESUMED.search(f.read().decode(errors="replace"))
            if found:
                result["resumed_at_step"] = int(found.group(1))
                result["restart_s"] = round(time.perf_counter() - removed["at"], 1)
            return bool(found)

        if run_name is None:
            events = [(lambda: actor_node(nodes, "VideoTokenizer") is not None, lambda: remove("VideoTokenizer"))]
        else:
            def first_checkpoint() -> bool:
                result["checkpoint_at_removal"] = registered_step(out / "ray" / run_name)
                return result["checkpoint_at_removal"] > 0

            events = [(first_checkpoint, lambda: remove(TRAIN_WORKER)), (resumed, lambda: None)]
        rc, result["total_s"] = run_job([*command, "--out", str(out)], env, log, events)
        result["finished_by_itself"] = rc == 0
        if rc != 0:
            result["first_rc"] = rc
            watch = removed and run_name is not None and "resumed_at_step" not in result
            rerun = [(resumed, lambda: None)] if watch else []
            rc, result["rerun_s"] = run_job([*command, "--out", str(out)], env, log, rerun)
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
