"""Resume listing and `finish()` against the number of shard records, on local disk and on an S3 server (moto, on
127.0.0.1), with the job's own code.

Setup (not timed): a tokenization of `--shards` shards in OUT, each with a shard file (a few bytes: only its listed
size matters here) and a record, the records written by the job's `RecordLog` in files of `--per-file` records (the
batches a long run leaves, one per `record_flush_s`); 1% of the shards have a failed input. Then, timed:

  resume    `TokenizeJob.finished_shards`: one listing of the shards, one of the records, a read of each record file
  finish    `TokenizeJob.finish`: every record read, errors.parquet and job.json written, the records compacted into one
            file and the others deleted
  resume after finish   `finished_shards` again, on the compacted record file

For contrast, the layout before this one (one JSON record per shard, each read with a request, 16 at a time) is timed
on `--legacy` records and scaled to the same count. The last line printed is one JSON object.

    python benchmarks/finish_scale.py [--shards 100000] [--per-file 1000] [--legacy 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pa_fs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.magvit import MagvitConfig, MagvitModel  # noqa: E402
from pipeline.storage import read_json, resolve_filesystem, write_json  # noqa: E402
from tokenize_jobs.job import RecordLog, TokenizeConfig, TokenizeJob  # noqa: E402
from tokenize_jobs.plan import Generation  # noqa: E402

INPUTS_PER_SHARD = 64


def record(index: int) -> dict:
    errors = [{"source": f"s3://corpus/videos/{index:08d}-03.mp4", "id": f"{index:08d}-03", "stage": "decode",
               "error_kind": "corrupt", "message": "Invalid data found when processing input", "clips_kept": 0}
              ] if index % 100 == 0 else []
    return {"index": index, "inputs": INPUTS_PER_SHARD, "clips": 256, "first_id": f"{index:08d}-00",
            "last_id": f"{index:08d}-63", "bytes": 8 + index % 7, "inputs_failed": len(errors), "inputs_partial": 0,
            "errors": errors, "truncated": []}


def populate(job: TokenizeJob, shards: int, per_file: int) -> None:
    fs = job.fs
    fs.create_dir(job.shard_dir, recursive=True)

    def put(index: int) -> None:
        with fs.open_output_stream(job.shard_path(index)) as f:
            f.write(b"x" * (8 + index % 7))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(shards)))
    log = RecordLog(fs, job.records_dir, flush_s=float("inf"))
    for index in range(shards):
        log.add(record(index))
        if len(log.pending) == per_file:
            log.flush()
    log.flush()


def timed(fn):
    began = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - began


def measure(out: str, video: str, shards: int, per_file: int, legacy: int) -> dict:
    cfg = load_config(TokenizeConfig, "paper", kind="tokenize")
    job = TokenizeJob(cfg, "manifest.parquet", out, video)
    began = time.perf_counter()
    populate(job, shards, per_file)
    setup = time.perf_counter() - began
    generations = [Generation(0, shards * INPUTS_PER_SHARD, 0, shards, 1, "0" * 64, "manifest.parquet", "t0")]
    done, resume = timed(lambda: job.finished_shards(shards))
    assert len(done) == shards, len(done)
    summary, finish = timed(lambda: job.finish({"fingerprint": job.fingerprint}, generations))
    assert summary["shards"] == shards and summary["inputs_failed"] == -(-shards // 100), summary
    done, resume_after = timed(lambda: job.finished_shards(shards))
    assert len(done) == shards

    folder = f"{job.job_dir}/legacy"
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: write_json(job.fs, f"{folder}/{i:08d}.json", record(i)), range(legacy)))
    _, legacy_s = timed(lambda: list(ThreadPoolExecutor(max_workers=16).map(
        lambda i: read_json(job.fs, f"{folder}/{i:08d}.json"), range(legacy))))
    scale = 100_000 / shards
    return {"shards": shards, "record_files": -(-shards // per_file), "setup_s": round(setup, 1),
            "resume_s": round(resume, 2), "finish_s": round(finish, 2), "resume_after_finish_s": round(resume_after, 2),
            "resume_s_per_100k": round(resume * scale, 2), "finish_s_per_100k": round(finish * scale, 2),
            "legacy_records": legacy, "legacy_s_per_100k": round(legacy_s * 100_000 / legacy, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--per-file", type=int, default=1000)
    parser.add_argument("--legacy", type=int, default=2000, help="one-file-per-record reads to time, then scale")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="finish-scale-"))
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(work / "video", MagvitModel(video), video)
    results = {"local": measure(str(work / "out"), str(work / "video"), args.shards, args.per_file, args.legacy)}
    print("local", json.dumps(results["local"]), flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
        fs, _ = resolve_filesystem("s3://bench")
        pa_fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                           allow_bucket_creation=True).create_dir("bench")
        results["moto_s3"] = measure("s3://bench/out", str(work / "video"), args.shards, args.per_file, args.legacy)
        print("moto_s3", json.dumps(results["moto_s3"]), flush=True)
    finally:
        server.stop()
    print(json.dumps({"benchmark": "finish_scale", **results, "machine": platform.machine(), "cpus": os.cpu_count(),
                      "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
