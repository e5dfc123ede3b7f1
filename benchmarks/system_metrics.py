"""The cost of system-metrics logging per training step: the training engine with `train.system_metrics_s = 0` (off)
against the default period (10 s) and an aggressive one (1 s), same model, batch and workers.

Each run is the product's trainer, `train.engine.fit` (Ray Train workers, DeepSpeed ZeRO-3, gloo on the CPU), training
the `debug` LLM flavor on one fixed batch of text-to-video sequences (`train_step.text_to_video_batch`), and logging to
an embedded MLflow store from rank 0 as `train llm` does. Every step is a logging step (`--log-every 1`, the worst
case: the default logs every 10 steps), so every step pays what system metrics add there: each node's sampler thread,
the sample taken when the period has not produced one since the last logging step, the `all_gather_object` of every
node's samples and the extra metrics in MLflow's log_batch. Step time is the wall time between consecutive logging
steps inside rank 0's loop (a training step plus the previous step's logging), the median after `--warmup` steps.

Rounds run every period once, in an order that rotates each round, so load from other processes falls on all of them.
`ratio` = median over rounds of the step with metrics at the default period / the same without; `ratio_<period>s` for
each period. On a loaded machine that ratio is mostly noise, so every run also times the system-metrics work of one
logging step alone in its workers before training (a sample, and the gather of every rank's; not the few extra metrics
in MLflow's batch): `alone_ms`, and `alone_fraction_of_step` of the step without metrics. The last printed line is one
JSON object with every figure.

    python benchmarks/system_metrics.py [--steps 60] [--warmup 10] [--rounds 2] [--periods 0,10,1] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace

import ray
import torch
from train_step import text_to_video_batch

from cluster import local_ray_env
from pipeline.config import from_dict, load_config, to_dict
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.tracking import TrackingConfig, start_run
from train.engine import DeepSpeedConfig, Objective, Recipe, TrainConfig, fit

DEFAULT_PERIOD = TrainConfig().system_metrics_s


def system_metrics_ms(times: int = 50) -> float:
    """Milliseconds of the system-metrics work of one logging step alone, timed on its own (every rank calls it): a
    sample on each node and the gather of every rank's samples, what `train.engine.worker_loop` adds to a logging
    step when the period is longer than the logging window (the sample is then taken there)."""
    import ray.train

    from train.telemetry import NodeSampler, gather

    context = ray.train.get_context()
    sampler = NodeSampler(3600.0) if context.get_local_rank() == 0 else None
    spent = []
    for _ in range(times):
        began = time.perf_counter()
        gather(sampler, context.get_node_rank())
        spent.append(time.perf_counter() - began)
    if sampler is not None:
        sampler.close()
    return 1000 * statistics.median(spent)


class LoopRecipe(Recipe):
    """The LM's loss on the fixed batch; `metrics`, called at every logging step, stamps the loop's time, and the
    last one returns the median step after the warmup, with the system-metrics work timed alone before training."""

    def __init__(self, worker):
        super().__init__(worker)
        self.model_cfg = from_dict(LLMConfig, worker.config["model"])
        batch = worker.config["batch"]
        self.inputs = (torch.from_numpy(batch["ids"]), torch.from_numpy(batch["prefix_len"]),
                       torch.from_numpy(batch["loss_mask"] > 0), None)
        self.stamps: list[float] = []
        self.alone_ms = system_metrics_ms()

    def modules(self):
        return {"model": Objective(VideoPoetLM(self.model_cfg))}

    def train_step(self, engines, draw):
        engine = engines["model"]
        loss, _ = engine(*self.inputs)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item()}

    def metrics(self, sums, seconds):
        self.stamps.append(time.perf_counter())
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][self.worker.config["warmup"]:]
        return {"loss": sums["loss"], "alone_ms": self.alone_ms,
                **({"step_s": statistics.median(steps)} if steps else {})}


class Bench:
    """The app config `fit` reads: training settings and DeepSpeed's."""

    def __init__(self, train: TrainConfig):
        self.train = train
        self.deepspeed = DeepSpeedConfig()


def run_once(name: str, model_cfg: LLMConfig, train: TrainConfig, batch, warmup: int,
             store: str) -> tuple[float, float]:
    """Median seconds per step (training and logging) of one `fit` in store/name, logging to the embedded MLflow store
    in `store` (one for every run: a fresh store spends seconds creating its tables), and the milliseconds of the
    system-metrics work of a logging step timed alone in that run's workers."""
    out = os.path.join(store, name)
    with start_run(TrackingConfig(), store, name) as run:
        result = fit(name, LoopRecipe, Bench(train), out, run, {}, model=to_dict(model_cfg), batch=batch,
                     warmup=warmup)
    return result.metrics["step_s"], result.metrics["alone_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="debug", help="LLM flavor or config TOML (default: debug)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step and worker (default: 2)")
    parser.add_argument("--steps", type=int, default=60, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--periods", default=f"0,{DEFAULT_PERIOD:g},1",
                        help=f"train.system_metrics_s values, 0 first (default: 0,{DEFAULT_PERIOD:g},1)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2, as `--config debug`)")
    parser.add_argument("--log-every", type=int, default=1, help="train.log_every (default: 1, every step)")
    args = parser.parse_args(argv)
    periods = [float(p) for p in args.periods.split(",")]
    if periods[0] != 0 or len(periods) < 2 or any(p < 0 for p in periods):
        parser.error(f"--periods must start with 0 and name at least one period > 0, got {args.periods!r}")
    if args.steps <= args.warmup + 2 * args.log_every:
        parser.error("--steps must leave at least two logging steps after --warmup")

    model_cfg = load_config(LLMConfig, args.flavor, [], kind="llm")
    train = replace(TrainConfig(), steps=args.steps, batch_size=args.batch, workers=args.workers,
                    log_every=args.log_every, eval_every=args.steps, checkpoint_every=args.steps, progress=False)
    batch = text_to_video_batch(model_cfg, args.batch)
    local_ray_env()  # the product's settings for an embedded Ray (cluster.init_ray)
    ray.init(num_cpus=max(os.cpu_count(), args.workers), include_dashboard=False, log_to_driver=False)
    steps: dict[float, list[float]] = {p: [] for p in periods}
    alone: list[float] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for period in periods[round_ % len(periods):] + periods[:round_ % len(periods)]:
                name = f"round{round_}-period{period:g}"
                step, ms = run_once(name, model_cfg, replace(train, system_metrics_s=period), batch,
                                    args.warmup // args.log_every, tmp)
                steps[period].append(step)
                alone.append(ms)
                print(f"round {round_} system_metrics_s={period:g}: {1000 * step:.1f} ms/step (system metrics "
                      f"alone: {ms:.2f} ms)", flush=True)
    ray.shutdown()

    off = statistics.median(steps[0.0])
    per_period = {f"{p:g}": round(1000 * statistics.median(steps[p]), 2) for p in periods}
    main_period = DEFAULT_PERIOD if DEFAULT_PERIOD in periods else periods[1]
    result = {
        "benchmark": "system_metrics", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "flavor": args.flavor, "batch": args.batch,
        "workers": args.workers, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "log_every": args.log_every, "step_ms": per_period,
        "step_ms_per_round": {f"{p:g}": [round(1000 * s, 2) for s in steps[p]] for p in periods},
        "ratio": round(statistics.median(steps[main_period]) / off, 3), "ratio_period_s": main_period,
        **{f"ratio_{p:g}s": round(statistics.median(steps[p]) / off, 3) for p in periods[1:]},
        "alone_ms": round(statistics.median(alone), 3),
        "alone_fraction_of_step": round(statistics.median(alone) / (1000 * off), 4),
        "wall_s": round(time.perf_counter() - began, 1),
    }
    print(f"{args.flavor} on {args.workers} workers, logging every {args.log_every} step(s): "
          + ", ".join(f"system_metrics_s={p} {ms} ms/step" for p, ms in per_period.items())
          + f"; ratio {result['ratio']} (period {main_period:g} s against off); the system-metrics work of a logging "
          f"step timed alone: {result['alone_ms']} ms ({result['alone_fraction_of_step']:.2%} of a step)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
