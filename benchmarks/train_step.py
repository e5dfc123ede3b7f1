"""Training step time: Ray Train `TorchTrainer` + DeepSpeed ZeRO-3 against a plain PyTorch loop, same model and batch.

Both paths train `pipeline.llm.VideoPoetLM` (the `demo` flavor by default) with AdamW, gradient clipping and the
warmup + cosine schedule of `train.engine.lr_at` on one fixed batch of text-to-video sequences built by
`pipeline.sequence.build_sequence`: 8 caption words (or 64 text-embedding positions when the flavor has no word range)
and a latent video of (5, 8, 8) codes for the demo's 64x64 clips, (5, 16, 16) for a paper-vocabulary flavor (17
frames of 128x128): 337 and 1,353 tokens per sequence. The trainer path is the product's: the training engine's
`train.engine.fit` on one worker (gloo on the CPU, NCCL on a GPU), whose step loop runs a recipe that trains the LM's
loss through DeepSpeed, as `train.llm` does. The plain path is the same model and `torch.optim.AdamW` in this process.

Rounds alternate the two paths and flip their order each round, so load from other processes falls on both. Each
round drops its first `--warmup` steps (allocator growth, DeepSpeed's first parameter gathers, CUDA kernel selection).
Step time is taken inside the loop that trains (inside the Ray worker for the trainer), each round's median kept:
`ratio` = median over rounds of the trainer's step / the same of the plain step, target <= 1.15. Wall time end to
end (Ray start-up, worker start-up, DeepSpeed initialization) is reported separately.

Threads: Ray sets a worker's OMP_NUM_THREADS, hence torch's intra-op threads, to the CPUs the worker reserves (1 by
default), while a plain process uses every CPU. So the plain path runs torch on `--threads` threads and the trainer's
worker reserves as many CPUs (`train.cpus_per_worker`); both report their `torch.get_num_threads()`. The default is 1
thread: on a shared, oversubscribed CPU the OpenMP barriers of multi-threaded kernels wait on descheduled threads.

On a GPU (`--device cuda`) both paths train in bf16 (autocast over fp32 weights for the plain loop, DeepSpeed's bf16
for the trainer). MFU (`train.flops.batch_flops`: the batch's model FLOPs per step time) is given against the
matmul peak measured in the training dtype (bf16 on a GPU, float32 on the CPU) and, on a GPU, against the spec sheet's
dense bf16 peak (`--spec-tflops`, 989 for an H100 or H200). Peak memory: `torch.cuda.max_memory_allocated` on a GPU
(the trainer's read inside its Ray worker), the process's peak RSS on the CPU. The last printed line is one JSON object
with every figure.

    python benchmarks/train_step.py [--flavor demo] [--batch 8] [--steps 6] [--warmup 2] [--rounds 3] [--threads 1]
    python benchmarks/train_step.py --device cuda --flavor 300m --batch 16 [--spec-tflops 989]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from cluster import local_ray_env
from pipeline.config import from_dict, load_config, to_dict
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sequence import Task, build_sequence
from pipeline.tracking import NullRun
from train.engine import DeepSpeedConfig, Objective, Recipe, TrainConfig, final_weights, fit, lr_at
from train.flops import batch_flops, matmul_peak_flops
from train.mixture import collate

WORDS = 8
TEXT_EMBEDDINGS = 64
H100_BF16_TFLOPS = 989.0  # dense bf16 of the H100 SXM spec sheet (the H200's is the same)


def latent_for(cfg: LLMConfig) -> tuple[int, int, int]:
    """The paper tokenizer's 128x128 latent for its 2^18 codebook, the demo tokenizer's 64x64 one otherwise."""
    return (5, 16, 16) if cfg.vocab.video_codes == 2**18 else (5, 8, 8)


def text_to_video_batch(cfg: LLMConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`batch` text-to-video sequences of random codes, collated; `text_embeddings` (B, 64, text_width) when the
    flavor conditions on a text encoder instead of words."""
    rng = np.random.default_rng(seed)
    latent = latent_for(cfg)
    sequences = []
    for _ in range(batch):
        video = rng.integers(cfg.vocab.video_codes, size=latent)
        if cfg.vocab.text_size:
            sequences.append(build_sequence(Task.TEXT_TO_VIDEO, cfg.vocab, video,
                                            text=rng.integers(cfg.vocab.text_size, size=WORDS)))
        else:
            sequences.append(build_sequence(Task.TEXT_TO_VIDEO, cfg.vocab, video, text_embeddings=TEXT_EMBEDDINGS))
    collated = collate(sequences)
    if not cfg.vocab.text_size:
        collated["text_embeddings"] = rng.standard_normal((batch, TEXT_EMBEDDINGS, cfg.text_width), np.float32)
    return collated


def tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    ids = torch.from_numpy(batch["ids"]).to(device)
    prefix_len = torch.from_numpy(batch["prefix_len"]).to(device)
    loss_mask = torch.from_numpy(batch["loss_mask"] > 0).to(device)
    embeddings = batch.get("text_embeddings")
    return ids, prefix_len, loss_mask, None if embeddings is None else torch.from_numpy(embeddings).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The device's peak allocated memory since the last reset on a GPU; on the CPU the process's peak RSS (Linux
    reports ru_maxrss in KiB)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ---------------------------------------------------------------------------------------------------- the two paths

def plain_steps(model_cfg: LLMConfig, train: TrainConfig, batch: dict[str, np.ndarray], steps: int,
                device: torch.device) -> tuple[list[float], float, float]:
    """Seconds per step of a bare PyTorch loop, the wall time from model construction to the last step, and the
    peak memory in GiB."""
    began = time.perf_counter()
    reset_peak_memory(device)
    torch.manual_seed(train.seed)
    model = VideoPoetLM(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    inputs = tensors(batch, device)
    times = []
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        with torch.autocast(device.type, torch.bfloat16, enabled=train.use_gpu):
            loss, _ = model.loss(*inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    wall = time.perf_counter() - began
    peak = peak_memory_gib(device)
    if device.type == "cuda":
        del model, optimizer
        torch.cuda.empty_cache()  # the trainer's worker shares the GPU
    return times, wall, peak


class TimedRecipe(Recipe):
    """The LM's loss on the fixed batch, each step timed inside the worker; the median after the warmup steps comes
    back as the run's last metrics."""

    def __init__(self, worker):
        super().__init__(worker)
        self.model_cfg = from_dict(LLMConfig, worker.config["model"])
        self.inputs = tensors(worker.config["batch"], worker.device)
        self.times: list[float] = []
        reset_peak_memory(worker.device)

    def modules(self):
        return {"model": Objective(VideoPoetLM(self.model_cfg))}

    def train_step(self, engines, draw):
        synchronize(self.worker.device)
        start = time.perf_counter()
        engine = engines["model"]
        loss, _ = engine(*self.inputs)
        engine.backward(loss)
        engine.step()
        loss.item()
        self.times.append(time.perf_counter() - start)
        return {"loss": loss.item()}

    def metrics(self, sums, seconds):
        timed = self.times[self.worker.config["warmup"]:]
        return {"step_s": statistics.median(timed), "threads": float(torch.get_num_threads()),
                "peak_memory_gib": peak_memory_gib(self.worker.device)}


class Bench:
    """The app config `fit` reads: training settings, DeepSpeed's, nothing tracked."""

    def __init__(self, train: TrainConfig):
        self.train = train
        self.deepspeed = DeepSpeedConfig()


def trainer_steps(name: str, model_cfg: LLMConfig, train: TrainConfig, batch: dict[str, np.ndarray], warmup: int,
                  out_dir: str) -> tuple[float, int, float, float]:
    """Median seconds per step inside the worker, the worker's torch threads, the wall time of the whole `fit`, and
    the worker's peak memory in GiB."""
    began = time.perf_counter()
    train = replace(train, log_every=train.steps, eval_every=train.steps, checkpoint_every=train.steps, progress=False)
    result = fit(name, TimedRecipe, Bench(train), out_dir, NullRun(), {}, model=to_dict(model_cfg), batch=batch,
                 warmup=warmup)
    final_weights(result)  # the export the run ends with
    metrics = result.metrics
    return metrics["step_s"], int(metrics["threads"]), time.perf_counter() - began, metrics["peak_memory_gib"]


# ---------------------------------------------------------------------------------------------------- main

def median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 1)


def mfu_figures(step_flops: float, steps: dict[str, list[float]], device: torch.device, spec_tflops: float
                ) -> dict[str, float]:
    """MFU of each path: the batch's model FLOPs (`train.flops.batch_flops`, as the trainer counts them) over the
    median step time, against the matmul peak measured in the training dtype and, on a GPU, the spec sheet's bf16
    peak."""
    cuda = device.type == "cuda"
    peak = matmul_peak_flops(device, torch.bfloat16 if cuda else torch.float32)
    figures = {"peak_tflops": round(peak / 1e12, 3), "peak_dtype": "bfloat16" if cuda else "float32"}
    for path, times in steps.items():
        achieved = step_flops / statistics.median(times)
        figures[f"{path}_tflops"] = round(achieved / 1e12, 3)
        figures[f"{path}_mfu"] = round(achieved / peak, 4)
        if cuda:
            figures[f"{path}_mfu_spec"] = round(achieved / (spec_tflops * 1e12), 4)
    if cuda:
        figures["spec_tflops"] = spec_tflops
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="demo", help="LLM flavor or config TOML (default: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="LLM config override")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: the demo's 8)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round and path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "1")),
                        help="torch threads of the plain loop (default 1, or $TORCH_THREADS)")
    parser.add_argument("--worker-cpus", type=int,
                        help="CPUs the trainer's worker reserves, hence its torch threads (default: --threads)")
    parser.add_argument("--spec-tflops", type=float, default=H100_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak from its spec sheet, for the second MFU figure (default: "
                             "989, H100 and H200)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    for name in ("batch", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or not args.spec_tflops > 0:
        parser.error("--warmup must be >= 0 and --spec-tflops > 0")

    device = torch.device(args.device)
    use_gpu = device.type == "cuda"
    model_cfg = load_config(LLMConfig, args.flavor, args.set, kind="llm")
    train = replace(TrainConfig(), steps=args.warmup + args.steps, batch_size=args.batch, workers=1,
                    use_gpu=use_gpu, cpus_per_worker=args.worker_cpus or args.threads)
    batch = text_to_video_batch(model_cfg, args.batch)
    tokens = int(batch["lengths"].sum())
    torch.set_num_threads(args.threads)

    began = time.perf_counter()
    local_ray_env()  # the product's settings for an embedded Ray (cluster.init_ray)
    ray.init(num_cpus=max(os.cpu_count(), train.cpus_per_worker), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - began
    steps: dict[str, list[float]] = {"plain": [], "trainer": []}
    walls: dict[str, list[float]] = {"plain": [], "trainer": []}
    peaks: dict[str, list[float]] = {"plain": [], "trainer": []}
    worker_threads = set()
    with tempfile.TemporaryDirectory() as out_dir:
        for round_ in range(args.rounds):
            for path in ("plain", "trainer") if round_ % 2 == 0 else ("trainer", "plain"):
                if path == "plain":
                    times, wall, peak = plain_steps(model_cfg, train, batch, train.steps, device)
                    step = statistics.median(times[args.warmup:])
                else:
                    step, threads, wall, peak = trainer_steps(f"round{round_}", model_cfg, train, batch,
                                                              args.warmup, out_dir)
                    worker_threads.add(threads)
                steps[path].append(step)
                walls[path].append(wall)
                peaks[path].append(peak)
                print(f"round {round_} {path}: median step {median_ms([step])} ms, {wall:.1f} s in all", flush=True)
    ray.shutdown()

    with torch.device("meta"):
        params = VideoPoetLM(model_cfg).num_params()
    result: dict[str, Any] = {
        "benchmark": "train_step", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name(device) if use_gpu else "cpu", "flavor": args.flavor,
        "overrides": args.set, "params": params, "batch": args.batch, "tokens_per_step": tokens,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "threads_plain": torch.get_num_threads(), "threads_trainer": sorted(worker_threads),
        "plain_step_ms": median_ms(steps["plain"]), "trainer_step_ms": median_ms(steps["trainer"]),
        "ratio": round(statistics.median(steps["trainer"]) / statistics.median(steps["plain"]), 3),
        "plain_tokens_per_s": round(tokens / statistics.median(steps["plain"])),
        "trainer_tokens_per_s": round(tokens / statistics.median(steps["trainer"])),
        "ray_start_s": round(ray_start_s, 2),
        "plain_wall_s": round(statistics.median(walls["plain"]), 2),
        "trainer_wall_s": round(statistics.median(walls["trainer"]), 2),
        "plain_peak_memory_gib": max(peaks["plain"]), "trainer_peak_memory_gib": max(peaks["trainer"]),
        "peak_memory": "torch.cuda.max_memory_allocated" if use_gpu else "process peak RSS",
        **mfu_figures(batch_flops(model_cfg, batch), steps, device, args.spec_tflops),
    }
    print(f"{args.flavor} ({params / 1e6:.1f}M parameters, {result['device']}, {tokens} tokens per step): plain "
          f"{result['plain_step_ms']} ms/step on {result['threads_plain']} threads, TorchTrainer + ZeRO-3 "
          f"{result['trainer_step_ms']} ms/step on {result['threads_trainer']}: ratio {result['ratio']}; wall per run "
          f"{result['plain_wall_s']} s plain, {result['trainer_wall_s']} s trainer (+ {result['ray_start_s']} s Ray "
          f"start-up); trainer MFU {result['trainer_mfu']:.1%} of the measured {result['peak_dtype']} matmul peak "
          f"({result['peak_tflops']} TFLOP/s), peak memory {result['trainer_peak_memory_gib']} GiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
