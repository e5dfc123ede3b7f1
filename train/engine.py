"""DeepSpeed inside Ray Train workers: engine construction, sharded checkpoints, and the consolidated export.

Every rank writes its ZeRO shard with `engine.save_checkpoint` into its own temporary folder and reports it; Ray
Train merges the ranks' folders into one checkpoint, so a resume finds every shard in
`<checkpoint>/deepspeed/<tag>`. DeepSpeed's shards are its own (pickled) resume format; what leaves a run for use
elsewhere is the consolidated export, safetensors plus config JSON (`pipeline.checkpoint`).

The learning rate follows `train.runner.lr_at` and is set on the optimizer's param groups each step, the same
schedule as the non-DeepSpeed apps.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from train.runner import STATE_FILE, TrainConfig, lr_at

TAG = "checkpoint"
FOLDER = "deepspeed"


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    gradient_accumulation_steps: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig) -> dict[str, Any]:
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and train.use_gpu)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage = 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "weight_decay": train.weight_decay,
            # DeepSpeed's fused CPU Adam is needed only when the optimizer step runs on the CPU by offload.
            "torch_adam": not ds.offload_optimizer}},
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, train: TrainConfig, ds: DeepSpeedConfig):
    import deepspeed
    import ray.train

    # DeepSpeed's own launcher exports LOCAL_SIZE (ranks per node). Without it, its CPU accelerator counts NUMA nodes
    # by running `numactl` at every ZeRO-3 gradient reduce: a subprocess per step.
    os.environ.setdefault("LOCAL_SIZE", str(ray.train.get_context().get_local_world_size()))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=deepspeed_config(train, ds))
    return engine


def set_lr(engine, step: int, train: TrainConfig) -> float:
    lr = lr_at(step, train)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr


def save(engine, step: int, metrics: dict[str, float], meta: dict[str, Any]) -> None:
    """Every rank saves its shard and reports it; rank 0 adds the run state."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, FOLDER), tag=TAG)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump({"step": step, **meta}, f, indent=2)
        dist.barrier()
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine) -> dict[str, Any] | None:
    """Load the latest checkpoint into `engine`; returns its state (step, ...) or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(os.path.join(folder, FOLDER), tag=TAG)
        return json.loads(Path(folder, STATE_FILE).read_text())


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights rebuilt from a checkpoint's ZeRO shards (any stage, any number of ranks)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(Path(checkpoint_dir) / FOLDER), tag=TAG)
    return {k: v.contiguous() for k, v in state.items()}


def final_weights(result) -> tuple[dict[str, torch.Tensor], int]:
    """The consolidated weights of a finished `fit`'s last checkpoint and its step. The apps' engine module wraps the
    model as `model` (an objective around it), so that prefix is removed."""
    with result.checkpoint.as_directory() as folder:
        weights = consolidated_state_dict(folder)
        step = json.loads(Path(folder, STATE_FILE).read_text())["step"]
    return {k.removeprefix("model."): v for k, v in weights.items()}, step
