"""Tokenize throughput: the streaming job against each of its stages alone, on the synthetic corpus.

After a warm-up job on a few clips (`--warmup-clips`), each round measures clips per second of
  job        `TokenizeJob.run` into a fresh OUT: decode actors -> tokenizer actors -> shards written by the driver
  decode     the decode stage alone (same actor pool)
  tokenizer  the tokenizer stages alone (same actor pools) on pre-decoded clips held in the object store
each end to end (pipeline and actor start-up and fill included) and in steady state: the clips after the first
output over the time from the first output to the last (the job's outputs are its shards as they appear; the
benchmark makes them small). Rounds are interleaved and each measure keeps its best steady-state round, so drift in
a shared machine's load hits all alike. Efficiency = job / min(decode, tokenizer): 1.0 means the pipeline runs as
fast as its slowest stage alone; `ratio` is the steady-state one, which is what a corpus of hours sees.
Peak memory is the largest sum of PSS (shared pages split between the processes sharing them) over this process
and every process under it (the local Ray: raylet, object store, workers), sampled every 0.2 s. Without
checkpoints the flavor's tokenizers get random weights, which tokenize as fast as trained ones. With GPUs in the
local Ray the tokenizer actors run on them in bf16 and the job's clips/s per GPU is reported too; `--device cuda`
refuses to run without one. The last line printed is one JSON object.

    python benchmarks/tokenize_job.py [--flavor demo] [--clips 96] [--rounds 2] [--video-tokenizer CKPT]
    python benchmarks/tokenize_job.py --device cuda --flavor paper --clips 64 --rounds 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

from cluster import init_ray
from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.synth import SynthConfig, write_corpus
from tokenize_jobs.job import TokenizeConfig, TokenizeJob

BENCH_INPUTS_PER_SHARD = 4  # small shards: the job's outputs come often enough to time its steady state


class Sampler:
    """Runs `sample()` every `interval_s` on a thread while the block runs."""

    interval_s = 0.2

    def sample(self) -> None: ...

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakMemory(Sampler):
    """The largest sum of PSS over this process and its descendants, in MiB."""

    def __init__(self):
        self.peak = 0

    def sample(self) -> None:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak = max(self.peak, total)

    @property
    def mib(self) -> float:
        return round(self.peak / 2 ** 20, 1)


class ShardWatcher(Sampler):
    """When each shard file of a folder first appeared."""

    interval_s = 0.05

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[Path, float] = {}

    def sample(self) -> None:
        now = time.perf_counter()
        for path in self.folder.glob("shard-*.parquet"):
            self.seen.setdefault(path, now)

    def outputs(self) -> list[tuple[float, int]]:
        return sorted((t, pq.read_metadata(path).num_rows) for path, t in self.seen.items())


def rates(began: float, outputs: list[tuple[float, int]]) -> tuple[float, float]:
    """(end-to-end, steady-state) clips/s of (time, clips) outputs; steady state runs from the first output."""
    clips = sum(n for _, n in outputs)
    end_to_end = clips / (outputs[-1][0] - began)
    if len(outputs) < 2:
        return end_to_end, end_to_end
    return end_to_end, (clips - outputs[0][1]) / (outputs[-1][0] - outputs[0][0])


def stage_outputs(ds) -> list[tuple[float, int]]:
    return [(time.perf_counter(), int(batch["ok"].sum()))
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy")]


def random_tokenizers(flavor: str, folder: Path) -> tuple[str, str]:
    """Random-weight checkpoints of the flavor's video and audio tokenizers."""
    torch.manual_seed(0)
    video = load_config(MagvitConfig, flavor, kind="video_tokenizer")
    audio = load_config(SoundStreamConfig, flavor, kind="audio_tokenizer")
    save_checkpoint(folder / "video", MagvitModel(video), video)
    save_checkpoint(folder / "audio", SoundStreamModel(audio), audio)
    return str(folder / "video"), str(folder / "audio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="demo", help="tokenize and tokenizer flavor (debug, demo, paper)")
    parser.add_argument("--clips", type=int, default=96, help="synthetic inputs, one clip each")
    parser.add_argument("--video-tokenizer", help="a trained MAGVIT checkpoint (default: random init of the flavor)")
    parser.add_argument("--audio-tokenizer", help="a trained SoundStream checkpoint (default: random init)")
    parser.add_argument("--no-audio", action="store_true", help="video tokens only")
    parser.add_argument("--rounds", type=int, default=2, help="each measure keeps its best of this many rounds")
    parser.add_argument("--warmup-clips", type=int, default=4, help="clips of the untimed first job (0: none)")
    parser.add_argument("--work", help="folder for the corpus and outputs (default: a temporary one)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda: fail unless the tokenizer actors get GPUs; cpu: hide the GPUs from Ray; auto: "
                             "GPUs when there are any (default)")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.rounds < 1 or args.warmup_clips < 0:
        parser.error("--clips and --rounds must be >= 1, --warmup-clips >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before Ray starts: it counts the GPUs this process can see

    work = Path(args.work or tempfile.mkdtemp(prefix="videopoet-bench-tokenize-"))
    cfg = load_config(TokenizeConfig, args.flavor, [f"inputs_per_shard={BENCH_INPUTS_PER_SHARD}"], kind="tokenize")
    random_init = args.video_tokenizer is None
    video, audio = (args.video_tokenizer, args.audio_tokenizer) if not random_init else \
        random_tokenizers(args.flavor, work / "tokenizers")
    audio = None if args.no_audio else audio
    began = time.perf_counter()
    corpus = work / "corpus"
    write_corpus(corpus, SynthConfig(), args.clips, seed=0)
    print(f"corpus: {args.clips} synthetic MP4s (160x128, 24 fps, 2.125 s, AAC) in {time.perf_counter() - began:.1f} s"
          f" -> {corpus}", flush=True)
    lines = (corpus / "manifest.jsonl").read_text().splitlines(True)
    (work / "warmup.jsonl").write_text("".join(lines[:args.warmup_clips]))

    init_ray()
    import ray

    if args.device == "cuda" and not ray.cluster_resources().get("GPU"):
        raise SystemExit("tokenize_job.py --device cuda: the Ray cluster has no GPU")

    load_start = os.getloadavg()
    if args.warmup_clips:
        TokenizeJob(cfg, str(work / "warmup.jsonl"), str(work / "warmup"), video, audio).run()

    jobs = [TokenizeJob(cfg, str(corpus / "manifest.jsonl"), str(work / f"out-{i}"), video, audio)
            for i in range(args.rounds)]
    # The stages alone run the plan of a job on an OUT of their own: planning records the inputs' ids in its OUT.
    stages = TokenizeJob(cfg, str(corpus / "manifest.jsonl"), str(work / "stages"), video, audio)
    plan_folder = tempfile.TemporaryDirectory(prefix="videopoet-bench-plan-")  # the plan's work parts
    plan = stages.plan(plan_folder.name)
    decoded = stages.decode(plan.work).materialize()  # the tokenizer stages' input
    runs: dict[str, list[tuple[float, float]]] = {"job": [], "decode": [], "tokenizer": []}
    memory: dict[str, float] = {}

    def measure(name: str, run) -> None:
        with PeakMemory() as peak:
            runs[name].append(run(time.perf_counter()))
        memory[name] = max(memory.get(name, 0.0), peak.mib)

    def run_job(job: TokenizeJob):
        def run(began: float) -> tuple[float, float]:
            with ShardWatcher(Path(job.shard_dir)) as shards:
                job.run()
            return rates(began, shards.outputs())
        return run

    for round_ in range(args.rounds):  # interleaved, so drift in the machine's load hits every measure alike
        measure("job", run_job(jobs[round_]))
        measure("decode", lambda began: rates(began, stage_outputs(stages.decode(plan.work))))
        measure("tokenizer", lambda began: rates(began, stage_outputs(stages.tokenize(decoded))))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {r[-1][1]:.2f}" for name, r in runs.items())
              + " clips/s steady", flush=True)
    load_end = os.getloadavg()
    plan_folder.cleanup()
    measured = {name: max(r, key=lambda rate: rate[1]) for name, r in runs.items()}
    clips = plan.inputs  # one clip per synthetic input

    end_to_end = {name: r[0] for name, r in measured.items()}
    steady = {name: r[1] for name, r in measured.items()}
    ratio = steady["job"] / min(steady["decode"], steady["tokenizer"])
    ratio_end_to_end = end_to_end["job"] / min(end_to_end["decode"], end_to_end["tokenizer"])
    gpus = int(ray.cluster_resources().get("GPU", 0))
    result = {
        "ratio": round(ratio, 3), "ratio_end_to_end": round(ratio_end_to_end, 3),
        "clips_per_s": {name: round(rate, 2) for name, rate in steady.items()},
        "clips_per_s_end_to_end": {name: round(rate, 2) for name, rate in end_to_end.items()},
        "job_clips_per_s_per_gpu": round(steady["job"] / gpus, 2) if gpus else None,
        "peak_pss_mib": memory, "clips": clips, "rounds": args.rounds, "flavor": args.flavor,
        "media": f"{cfg.media.height}x{cfg.media.width}", "audio": audio is not None, "random_init": random_init,
        "gpus": gpus, "cpus": int(ray.cluster_resources().get("CPU", 0)),
        "load_average": [round(load_start[0], 2), round(load_end[0], 2)],
        "date": datetime.date.today().isoformat(), "machine": platform.machine(),
    }
    label = "random-init " if random_init else ""
    print(f"tokenizers: {label}{args.flavor} video{' + audio' if audio else ''}; media {result['media']}; "
          f"{result['cpus']} CPUs, {gpus} GPUs; load average {load_start[0]:.1f} -> {load_end[0]:.1f}")
    for name in measured:
        print(f"{name:>9}: {steady[name]:7.2f} clips/s steady, {end_to_end[name]:7.2f} end to end; "
              f"peak PSS {memory[name]:8.1f} MiB")
    print(f"efficiency = job / min(decode, tokenizer) = {ratio:.3f} steady, {ratio_end_to_end:.3f} end to end")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
