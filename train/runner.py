"""Shared Ray Train machinery: the trainer, its resume, worker-side checkpoints and the learning-rate schedule.

Every training app (tokenizers, LLM, super-resolution) builds a `TorchTrainer` through `fit`, so resume, failure
handling and checkpoint layout are the same everywhere. Resume is Ray Train's own: re-running with the same
`--out` re-creates the trainer under the same `RunConfig(name, storage_path)`, and workers find the latest checkpoint
with `ray.train.get_checkpoint()`. Batches are a pure function of (seed, step), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.tracking import attach, start_run

STATE_FILE = "state.json"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # per worker
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    workers: int = 2
    # CPUs each worker reserves; Ray sets the worker's OMP_NUM_THREADS, hence torch's intra-op threads, to this.
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start an embedded local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=os.environ.get("VIDEOPOET_RAY_LOGS", "1") == "1")


def fit(name: str, loop: Callable[[dict], None], loop_config: dict[str, Any], cfg: TrainConfig, out_dir: str | Path,
        datasets: dict[str, Any] | None = None):
    """Run (or resume) `loop` on `cfg.workers` Ray Train workers; checkpoints live under `out_dir/ray/name`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    for dataset in (datasets or {}).values():
        # Workers iterate these every run; their progress bars would flood the driver's log.
        dataset.context.enable_progress_bars = False
    storage = Path(out_dir).resolve() / "ray" if "://" not in str(out_dir) else f"{str(out_dir).rstrip('/')}/ray"
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        # Every worker sees the whole (small, materialized) dataset and takes its own deterministic slice, so the
        # slice cannot change between a run and its resume.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()


def save_checkpoint(step: int, metrics: dict[str, float], tensors: dict[str, dict[str, torch.Tensor]],
                    meta: dict[str, Any]) -> None:
    """Report `metrics` with a checkpoint from rank 0; every rank must call this at the same step.

    `tensors` maps file stems to flat tensor dicts (model weights, optimizer state), stored as safetensors so a
    resume never unpickles anything.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            for stem, flat in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, os.path.join(tmp, f"{stem}.safetensors"))
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"step": step, **meta}, f, indent=2)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)


def load_latest_checkpoint() -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]] | None:
    """(state.json, {stem: tensors}) of the run's latest checkpoint, or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    return state, tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam-style optimizer state as a flat tensor dict (param index . slot)."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for slot, value in state.items():
            flat[f"{index}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


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


def open_run(app: Any, out: Path, name: str, parent):
    """The run's MLflow run: a child of `parent`, or the run of a previous invocation being resumed, or a new one."""
    if parent is not None:
        return parent.child(name, app)
    record = out / RUN_FILE
    if record.exists():
        saved = json.loads(record.read_text())
        return attach(saved["uri"], saved["run_id"])
    run = start_run(app.tracking, out, name, params=app)
    record.write_text(json.dumps({"uri": run.uri, "run_id": run.run_id}) + "\n")
    return run


def add_run_arguments(parser: argparse.ArgumentParser, flavors: str = "debug, demo, paper") -> None:
    """The options every training app shares: config, overrides, run folder, steps and workers."""
    parser.add_argument("--config", default="demo", help=f"flavor ({flavors}) or a TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-3 or --set model.depth=8")
    parser.add_argument("--out", required=True, help="run folder; re-running with the same folder resumes")
    parser.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")


def app_config(cls: type, args: argparse.Namespace, kind: Mapping[str, str]) -> Any:
    """The app's config from `add_run_arguments` options; raises ConfigError or ValueError naming the problem."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    return load_config(cls, args.config, overrides, kind=kind)

