"""The training engine every app runs on: Ray Train workers, DeepSpeed, the step loop, checkpoints, resume, export.

An app (the video and audio tokenizers, the LLM, super-resolution) gives the engine a `Recipe`, built on every worker:
its modules, a training step that draws its batch from (seed, draw, rank), how its window sums become logged metrics,
and its validation. The engine owns everything else, the same way for every app:

- workers: a `TorchTrainer` of `train.workers` workers (gloo on CPU, NCCL with `train.use_gpu`), each reserving
  `train.cpus_per_worker` CPUs (Ray sets the worker's torch threads to that); elastic between `train.min_workers` and
  `train.workers` when min_workers > 0;
- optimization: one DeepSpeed engine per module (ZeRO stage 0-3, offload, bf16, gradient accumulation, clipping),
  AdamW with linear warmup and cosine decay (`lr_at`); a second module, such as a GAN discriminator, gets its own;
- the loop: every draw reseeds torch from (seed, draw, rank), so random choices inside the models (codebook restarts)
  replay exactly on resume; modules' buffers follow rank 0's before every draw (as DDP broadcasts them);
- logging: rank 0 logs every `log_every` steps (window sums averaged over ranks) and validation every `eval_every`
  steps to MLflow, and prints a progress line (step, loss, steps/s, time left) unless `train.progress` is off;
- checkpoints: every `checkpoint_every` steps each rank saves its DeepSpeed shards and all ranks report one checkpoint
  to Ray Train (`report_checkpoint`); a re-run with the same OUT, or a restart after a worker failure
  (`train.max_failures`), resumes from the latest one. DeepSpeed's shards are its own resume format (pickles: only
  resume from checkpoints you wrote). The last checkpoint also holds the full fp32 weights of the `model` module as
  safetensors, which the driver exports (`final_weights`) without unpickling anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import from_dict, to_dict
from pipeline.storage import is_uri
from pipeline.tracking import NullRun, attach

STATE_FILE = "state.json"  # in a checkpoint: the step and the recipe's state
WEIGHTS_FILE = "model.safetensors"  # in the last checkpoint: the full fp32 weights of the `model` module
MODEL = "model"  # the module a run exports
TAG = "checkpoint"
SHARDS_DIR = "deepspeed"


# ---------------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # per worker and micro-batch
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0: no clipping
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    workers: int = 2
    # > 0: elastic training. Ray Train starts with as many workers as the cluster holds, from min_workers to
    # `workers`; a lost node or a new one resizes the group: a restart from the last checkpoint, resharded.
    min_workers: int = 0
    # CPUs each worker reserves; Ray sets the worker's OMP_NUM_THREADS, hence torch's intra-op threads, to this.
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails
    progress: bool = True  # rank 0 prints a progress line every `log_every` steps
    system_metrics_s: float = 10.0  # sampling period of every node's CPU, memory and GPU metrics (0: off)

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.system_metrics_s < 0:
            raise ValueError(f"train.system_metrics_s must be >= 0 (0: off), got {self.system_metrics_s!r}")
        for name in ("warmup_steps", "max_failures", "seed", "min_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.min_workers > self.workers:
            raise ValueError(f"train.min_workers ({self.min_workers}) must be <= train.workers ({self.workers})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ValueError(f"train.weight_decay and train.grad_clip must be >= 0, got {self.weight_decay!r} and "
                             f"{self.grad_clip!r}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must lie in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    gradient_accumulation_steps: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self):
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"deepspeed.gradient_accumulation_steps must be >= 1, got "
                             f"{self.gradient_accumulation_steps!r}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage = 3")

    def bf16(self, train: TrainConfig) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and train.use_gpu)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    adam: dict[str, Any] = {"lr": train.lr, "betas": list(train.betas), "weight_decay": train.weight_decay,
                            # DeepSpeed's fused CPU Adam is needed only when the optimizer step runs on the CPU by
                            # offload; otherwise torch's AdamW, fused on GPU.
                            "torch_adam": not ds.offload_optimizer}
    if train.use_gpu and not ds.offload_optimizer:
        adam["fused"] = True  # torch's fused CUDA kernel: one launch for all parameters
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16(train)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------------------------------- workers

class Objective(torch.nn.Module):
    """A DeepSpeed engine's module: its forward is the model's loss method (`loss`, or e.g. `discriminator_loss`), so
    DeepSpeed's hooks (ZeRO-3 gathers, gradient reduction) see the whole computation. State dict keys gain the
    `model.` prefix, which the export removes."""

    def __init__(self, model: torch.nn.Module, method: str = "loss"):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.method)(*args, **kwargs)


@dataclass
class Worker:
    """What a recipe knows about the worker it runs on."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the engines' compute dtype: bf16 on GPU by default, fp32 on CPU
    train: TrainConfig
    config: dict[str, Any]  # the loop config the driver passed (the app's config and the app's own entries)
    tracker: Any  # rank 0: the run's MLflow run; other ranks: a NullRun

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)


class Recipe(ABC):
    """An app's side of training, built on every worker from the loop config: subclasses load their data in
    `__init__` and implement the methods below. Every rank must run the same collective calls in the same order
    (ZeRO-3 gathers parameters collectively), so validation runs on every rank."""

    def __init__(self, worker: Worker):
        self.worker = worker

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules to optimize, one DeepSpeed engine each; `model` is the one exported."""

    @abstractmethod
    def train_step(self, engines: Mapping[str, Any], draw: int) -> dict[str, float]:
        """Forward, backward and step of one micro-batch; returns sums to accumulate over the logging window."""

    @abstractmethod
    def metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        """Logged metrics from the window's sums (averaged over ranks) and its wall time; `loss` is shown."""

    def validate(self, engines: Mapping[str, Any]) -> dict[str, float]:
        return {}

    def state(self) -> dict[str, Any]:
        """JSON-able state saved in every checkpoint beside the step."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back `state()` from the checkpoint a run resumes from."""

    def finish(self, engines: Mapping[str, Any]) -> None:
        """After the last step, on every rank (rank 0 may log artifacts)."""


def world() -> tuple[int, int]:
    import ray.train

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over workers (a no-op with one worker)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, tensor)}


def _build_engine(module: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig, universal: bool = False):
    """A DeepSpeed engine for `module`; `universal` when it will load a universal checkpoint (one saved at another
    world size and converted)."""
    import deepspeed
    import ray.train

    # DeepSpeed's own launcher exports LOCAL_SIZE (ranks per node). Without it, its CPU accelerator counts NUMA nodes
    # by running `numactl` at every ZeRO-3 gradient reduce: a subprocess per step.
    os.environ.setdefault("LOCAL_SIZE", str(ray.train.get_context().get_local_world_size()))
    config = deepspeed_config(train, ds)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=module, config=config,
                                           model_parameters=[p for p in module.parameters() if p.requires_grad])
    return engine


def _universal(shards: str, target: str) -> str:
    """DeepSpeed's universal checkpoint of the shards in `shards/<TAG>`, written to `target/<TAG>`: parameters and
    optimizer state per parameter, which any number of ranks can load (ZeRO re-partitions them on load)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    to_universal(Namespace(input_folder=os.path.join(shards, TAG), output_folder=os.path.join(target, TAG),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=False))
    return target


def _sync_buffers(engines: Mapping[str, Any]) -> None:
    """Give every rank rank 0's buffers (codebooks moved by EMA in the forward pass), as DDP does each forward."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    for engine in engines.values():
        for buffer in engine.module.buffers():
            dist.broadcast(buffer.data, 0)


def _full_weights(engine) -> dict[str, torch.Tensor]:
    """The module's full fp32 state dict on every rank (collective under ZeRO-3): master weights where the optimizer
    keeps them (ZeRO 1-3, bf16), the parameters themselves otherwise, and the buffers."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        weights[name] = (param.detach() if full is None else full).float().cpu().contiguous()
    for name, buffer in engine.module.named_buffers():
        if name in engine.module.state_dict():
            weights[name] = buffer.detach().cpu().contiguous()
    return {k.removeprefix(f"{MODEL}."): v for k, v in weights.items()}


def report_checkpoint(engines: Mapping[str, Any], step: int, metrics: dict[str, float], state: dict[str, Any],
                      final: bool) -> None:
    """Every rank saves its DeepSpeed shards of every engine; rank 0 adds the run state (and, at the end, the full
    weights); all ranks report the one checkpoint to Ray Train."""
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine in engines.items():
            engine.save_checkpoint(os.path.join(tmp, SHARDS_DIR, name), tag=TAG)
        weights = _full_weights(engines[MODEL]) if final else None
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({"step": step, "world_size": dist.get_world_size(), **state},
                                                        indent=2))
            if weights is not None:
                save_file(weights, os.path.join(tmp, WEIGHTS_FILE))
        dist.barrier()
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def saved_state() -> dict[str, Any] | None:
    """The state of the run's latest checkpoint (step, world size, ...), or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads(Path(folder, STATE_FILE).read_text())


def restore_checkpoint(engines: Mapping[str, Any], reshard: bool) -> None:
    """Load the run's latest checkpoint into the engines. With `reshard` (it was saved at another world size), each
    engine's shards are first converted to DeepSpeed's universal format, which the engines were built to load."""
    import ray.train

    with ray.train.get_checkpoint().as_directory() as folder, tempfile.TemporaryDirectory() as tmp:
        for name, engine in engines.items():
            shards = os.path.join(folder, SHARDS_DIR, name)
            engine.load_checkpoint(_universal(shards, os.path.join(tmp, name)) if reshard else shards, tag=TAG)


def say(line: str) -> None:
    """A console line from a worker, once. Ray Train patches `print` in its workers to log through its logger and,
    where a library has wrapped sys.stdout, to print as well: every line twice. The process's own stdout is written
    once, and Ray's log monitor forwards it to the driver."""
    print(line, file=sys.__stdout__, flush=True)


class _Progress:
    """The console line rank 0 prints at each logging step: where the run is and how long it has left."""

    def __init__(self, name: str, start: int, steps: int):
        self.name, self.start, self.steps = name, start, steps
        self.began = time.perf_counter()

    def line(self, done: int, metrics: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self.began
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        left = (self.steps - done) / rate if rate > 0 else float("nan")
        shown = "".join(f" {key} {metrics[key]:{spec}}" for key, spec in (("loss", ".4f"), ("val_loss", ".4f"),
                                                                           ("lr", ".2e")) if key in metrics)
        return (f"[{self.name}] step {done}/{self.steps}{shown} "
                f"{rate:.2f} steps/s, {_duration(elapsed)} elapsed, {_duration(left)} left")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _unlink_shared_memory(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm buffer per rank and never unlinks it: every run would leave
    one per worker behind until /dev/shm fills. Once every rank has its engines (after the barrier), every rank has
    mapped its peers' buffers, and unlinking this rank's name keeps the mappings."""
    torch.distributed.barrier()
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def worker_loop(config: dict[str, Any]) -> None:
    """The body of every Ray Train worker: build the recipe and its engines, resume, train, checkpoint."""
    import ray.train

    from train.telemetry import NodeSampler
    from train.telemetry import gather as gather_system_metrics

    train = from_dict(TrainConfig, config["train"])
    ds = from_dict(DeepSpeedConfig, config["deepspeed"])
    rank, world_size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if train.use_gpu else torch.device("cpu")
    tracker = attach(config["tracking_uri"], config["run_id"]) if rank == 0 else NullRun()
    worker = Worker(rank, world_size, device, torch.bfloat16 if ds.bf16(train) else torch.float32, train, config,
                    tracker)
    torch.manual_seed(train.seed)  # the same initial weights on every rank
    recipe: Recipe = config["recipe"](worker)
    state = saved_state()
    reshard = state is not None and state.get("world_size", world_size) != world_size
    engines = {name: _build_engine(module, train, ds, universal=reshard) for name, module in recipe.modules().items()}
    _unlink_shared_memory(rank)
    start = 0
    if state is not None:
        restore_checkpoint(engines, reshard)
        start = state["step"]
        recipe.restore(state)
        if rank == 0 and (train.progress or reshard):
            how = (f" (saved by {state['world_size']} workers, resharded onto {world_size}: DeepSpeed universal "
                   "checkpoint)") if reshard else ""
            say(f"[{config['name']}] resumed at step {start}{how}")

    progress = _Progress(config["name"], start, train.steps)
    context = ray.train.get_context()
    sampler = (NodeSampler(train.system_metrics_s)
               if train.system_metrics_s and context.get_local_rank() == 0 else None)
    sums: dict[str, float] = {}
    window_began = time.perf_counter()
    accumulation = ds.gradient_accumulation_steps
    for step in range(start, train.steps):
        lr = lr_at(step, train)
        for engine in engines.values():
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
        for micro in range(accumulation):
            draw = step * accumulation + micro
            torch.manual_seed(int(np.random.default_rng([train.seed, draw, rank]).integers(2**62)))
            _sync_buffers(engines)
            for key, value in recipe.train_step(engines, draw).items():
                sums[key] = sums.get(key, 0.0) + value
        done = step + 1
        last = done == train.steps
        metrics: dict[str, float] = {}
        if done % train.log_every == 0 or last:
            metrics = {**recipe.metrics(all_reduce_mean(sums), time.perf_counter() - window_began), "lr": lr}
            if train.system_metrics_s:
                metrics.update(gather_system_metrics(sampler, context.get_node_rank()))
            sums, window_began = {}, time.perf_counter()
        if done % train.eval_every == 0 or last:
            for engine in engines.values():
                engine.eval()
            metrics.update(recipe.validate(engines))
            for engine in engines.values():
                engine.train()
        if metrics:
            tracker.log_metrics(metrics, step=done)
            if rank == 0 and train.progress:
                say(progress.line(done, metrics))
        if done % train.checkpoint_every == 0 or last:
            report_checkpoint(engines, done, metrics, recipe.state(), final=last)
    if sampler is not None:
        sampler.close()
    if start < train.steps:
        recipe.finish(engines)


# ---------------------------------------------------------------------------------------------------- driver

def fit(name: str, recipe: type[Recipe], app: Any, out: str, run: Any, datasets: dict[str, Any], **entries: Any):
    """Run (or resume) `recipe` on `app.train.workers` Ray Train workers, with checkpoints under
    OUT/ray/<name>; `entries` reach the workers in `Worker.config`. Returns Ray Train's `Result`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster import init_ray

    init_ray()
    train: TrainConfig = app.train
    for dataset in datasets.values():
        # Workers iterate these every run; their progress bars would flood the driver's log.
        dataset.context.enable_progress_bars = False
    storage = f"{out.rstrip('/')}/ray" if is_uri(out) else str(Path(out).resolve() / "ray")
    loop_config = {"name": name, "recipe": recipe, "app": to_dict(app), "train": to_dict(train),
                   "deepspeed": to_dict(app.deepspeed), "tracking_uri": run.uri, "run_id": run.run_id, **entries}
    workers = (train.min_workers, train.workers) if train.min_workers else train.workers  # a range: elastic
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=train.use_gpu,
                                               resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
        # Every worker sees the whole (small, materialized) dataset and takes its own deterministic slice, so the
        # slice cannot change between a run and its resume.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()


def final_weights(result) -> tuple[dict[str, torch.Tensor], int]:
    """The exported module's full weights in a finished run's last checkpoint, and its step."""
    with result.checkpoint.as_directory() as folder:
        step = json.loads(Path(folder, STATE_FILE).read_text())["step"]
        return load_file(str(Path(folder, WEIGHTS_FILE))), step


def result_metrics(result) -> dict[str, float]:
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
