"""`videopoet train llm`: the VideoPoet LLM on Ray Train + DeepSpeed, trained on token shards with the task mixture.

Data: the shards' token rows go through Ray Data to every worker, which keeps its slice (by clip id) of the compact
token rows; each step draws one task and a batch from (seed, step, rank), so a resumed run continues with exactly
the batches an uninterrupted one would have seen. Validation loss per task is computed on the `val` split on every
rank together (ZeRO-3 gathers parameters collectively) and reduced. Rank 0 logs losses per task, validation losses,
tokens/s, estimated MFU, learning rate and the padding share to MLflow.

Outputs: OUT/ray/llm (Ray Train's sharded DeepSpeed checkpoints) and OUT/model (the consolidated safetensors export
with its config JSON, the word vocabulary and the shards' tokenizer record), which `videopoet generate` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import read_metadata, save_checkpoint
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.shards import open_shards
from pipeline.text import TextConfig, WordVocabulary, load_text_conditioner, stack_embeddings
from pipeline.tracking import NullRun, TrackingConfig, attach
from pipeline.vocab import Vocabulary
from train.data import shard_columns, split_datasets
from train.engine import DeepSpeedConfig, build_engine, final_weights, restore, save, set_lr
from train.flops import matmul_peak_flops, transformer_flops_per_token
from train.mixture import Mixture, MixtureConfig, Row, collate, rows_from_table
from train.runner import TrainConfig, add_run_arguments, all_reduce_mean, app_config, fit, init_ray, open_run, world

TOKEN_COLUMNS = ["clip_id", "caption", "split", "video_tokens", "video_shape", "audio_tokens", "audio_shape",
                 "structure_tokens", "structure_shape"]
WORDS_FILE = "words.json"


@dataclass(frozen=True)
class LLMTrainConfig:
    model: LLMConfig = field(default_factory=LLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_batches: int = 2  # per task with inputs in the val split


class Objective(torch.nn.Module):
    """The engine's module: its forward is the LM's loss, so DeepSpeed's hooks see the whole computation."""

    def __init__(self, model: VideoPoetLM):
        super().__init__()
        self.model = model

    def forward(self, ids, prefix_len, loss_mask, text_embeddings=None):
        return self.model.loss(ids, prefix_len, loss_mask, text_embeddings)


# ---------------------------------------------------------------------------------------------------- data

def vocabulary_for(shards, text_size: int) -> Vocabulary:
    """The unified vocabulary the shards' tokenizers and the text conditioner need."""
    video = shards.meta.tokenizers["video"]["config"]
    audio = shards.meta.tokenizers.get("audio")
    levels, codes = (0, 0) if audio is None else (audio["config"]["quantizer"]["levels"],
                                                  audio["config"]["quantizer"]["codebook_size"])
    return Vocabulary(video_codes=2 ** video["quantizer"]["bits"], audio_levels=levels, audio_codes=codes,
                      text_size=text_size)


def collect_rows(shard, rank: int = 0, world_size: int = 1) -> list[Row]:
    """This rank's slice of a dataset shard's token rows, ordered by clip id."""
    return rows_from_table(shard_columns(shard, TOKEN_COLUMNS, rank, world_size))


def to_tensors(batch: dict[str, np.ndarray], conditions, device: torch.device):
    return (torch.from_numpy(batch["ids"]).to(device), torch.from_numpy(batch["prefix_len"]).to(device),
            torch.from_numpy(batch["loss_mask"] > 0).to(device), _embeddings(conditions, device))


def _embeddings(conditions, device):
    stacked = stack_embeddings(conditions)
    return None if stacked is None else stacked.to(device)


# ---------------------------------------------------------------------------------------------------- worker loop

def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    app = from_dict(LLMTrainConfig, config["app"])
    model_cfg = from_dict(LLMConfig, config["model"])
    cfg = app.train
    rank, world_size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = VideoPoetLM(model_cfg)
    engine = build_engine(Objective(model), cfg, app.deepspeed)
    state = restore(engine)
    start = state["step"] if state else 0

    text = (WordVocabulary.from_json(config["words"]) if app.text.kind == "words"
            else load_text_conditioner(app.text))
    mixture = Mixture(app.mixture, model_cfg.vocab, text, cfg.steps)
    rows = collect_rows(ray.train.get_dataset_shard("train"), rank, world_size)
    # Every rank keeps all validation rows: ZeRO-3 forwards are collective, so all ranks must run the same ones.
    val_rows = collect_rows(ray.train.get_dataset_shard("val"))
    if not rows:
        raise RuntimeError(f"rank {rank}: no training rows in {config['data']}")
    tracker = attach(config["tracking_uri"], config["run_id"]) if rank == 0 else NullRun()
    flops_per_token = transformer_flops_per_token(model_cfg, config["mean_length"])
    peak = matmul_peak_flops(device, torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)

    sums: dict[str, float] = {}
    skipped: dict[str, int] = {}
    window_began, window_tokens = time.perf_counter(), 0
    accumulation = app.deepspeed.gradient_accumulation_steps
    for step in range(start, cfg.steps):
        lr = set_lr(engine, step, cfg)
        for micro in range(accumulation):
            draw = step * accumulation + micro
            task, sequences, conditions = mixture.batch(rows, draw, cfg.seed, rank, cfg.batch_size, skipped)
            batch = collate(sequences)
            loss, stats = engine(*to_tensors(batch, conditions, device))
            engine.backward(loss)
            engine.step()
            _add(sums, f"{task.value}.loss_sum", stats["loss_sum"].sum().item())
            _add(sums, f"{task.value}.tokens", stats["tokens"].sum().item())
            _add(sums, "padding_sum", float(batch["padding"]))
            _add(sums, "batches", 1)
            window_tokens += int(batch["lengths"].sum())
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            seconds = time.perf_counter() - window_began
            reduced = all_reduce_mean({**sums, "tokens_per_s": window_tokens / seconds})
            metrics = _task_losses(reduced)
            tokens_per_s = reduced["tokens_per_s"] * world_size
            metrics.update(lr=lr, tokens_per_s=tokens_per_s, padding=reduced["padding_sum"] / reduced["batches"],
                           mfu=tokens_per_s * flops_per_token / (peak * world_size))
            sums, window_began, window_tokens = {}, time.perf_counter(), 0
        if val_rows and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics.update(validate(engine, mixture, val_rows, app, device))
        if metrics:
            tracker.log_metrics(metrics, step=done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if rank == 0 and skipped:
                tracker.log_dict(skipped, "skipped_rows.json")
            save(engine, done, {k: v for k, v in metrics.items() if k.startswith(("loss", "val_loss"))},
                 {"skipped": skipped})


def _add(sums: dict[str, float], key: str, value: float) -> None:
    sums[key] = sums.get(key, 0.0) + value


def _task_losses(sums: dict[str, float], prefix: str = "loss") -> dict[str, float]:
    losses = {f"{prefix}/{k[: -len('.loss_sum')]}": v / max(sums[k[: -len('.loss_sum')] + ".tokens"], 1)
              for k, v in sums.items() if k.endswith(".loss_sum")}
    total = sum(v for k, v in sums.items() if k.endswith(".loss_sum"))
    tokens = sum(v for k, v in sums.items() if k.endswith(".tokens"))
    return {**losses, prefix: total / max(tokens, 1)}


@torch.no_grad()
def validate(engine, mixture: Mixture, rows: list[Row], app: LLMTrainConfig, device) -> dict[str, float]:
    """Loss per task on held-out rows. Every rank holds the same rows and runs the same number of forwards in the
    same task order (ZeRO-3 gathers parameters collectively), each on its own random batches."""
    sums: dict[str, float] = {}
    rank, _ = world()
    engine.eval()
    for task in mixture.tasks:
        usable = [r for r in rows if mixture.lacks(task, r) is None]
        for i in range(app.val_batches):
            rng = np.random.default_rng([app.train.seed, i, rank, 2])
            picked = [usable[j] for j in rng.integers(len(usable), size=app.train.batch_size)] if usable else []
            if not picked:
                continue
            built = [mixture.build(task, row, rng) for row in picked]
            batch = collate([b[0] for b in built])
            _, stats = engine(*to_tensors(batch, [b[1] for b in built], device))
            _add(sums, f"{task.value}.loss_sum", stats["loss_sum"].sum().item())
            _add(sums, f"{task.value}.tokens", stats["tokens"].sum().item())
    engine.train()
    keys = [f"{t.value}.{s}" for t in mixture.tasks for s in ("loss_sum", "tokens")]
    return _task_losses(all_reduce_mean({k: sums.get(k, 0.0) for k in keys}), prefix="val_loss")


# ---------------------------------------------------------------------------------------------------- driver

def train_llm(app: LLMTrainConfig, data: str | list[str], out: str | Path, parent=None) -> dict[str, Any]:
    """Train (or resume) the LLM on shards; returns the summary also written to OUT/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = open_shards(data)
    table = shards.to_table(["caption", "split"])
    words_path = out / WORDS_FILE
    if app.text.kind == "words" and not words_path.exists():
        load_text_conditioner(app.text, table.column("caption").to_pylist()).save(words_path)
    text = WordVocabulary.load(words_path) if app.text.kind == "words" else load_text_conditioner(app.text)
    model_cfg = replace(app.model, vocab=vocabulary_for(shards, text.text_size))
    (out / "config.json").write_text(json.dumps({**to_dict(app), "model": to_dict(model_cfg)}, indent=2) + "\n")

    run = open_run(app, out, "llm", parent)
    began = time.perf_counter()
    init_ray()
    with run:
        train_ds, val_ds = split_datasets(shards, TOKEN_COLUMNS)
        lengths = [len(s) for s in shards.to_table(["video_tokens"]).column("video_tokens").to_pylist()[:64]]
        run.log_params({"vocab_size": model_cfg.vocab.size, "parameters": _parameters(model_cfg),
                        "shards_fingerprint": shards.fingerprint})
        run.log_metrics({"train_clips": train_ds.count(), "val_clips": val_ds.count()})
        result = fit("llm", train_loop,
                     {"app": to_dict(app), "model": to_dict(model_cfg), "data": str(data),
                      "words": words_path.read_text() if app.text.kind == "words" else "",
                      "mean_length": float(np.mean(lengths)) + 16, "tracking_uri": run.uri, "run_id": run.run_id},
                     app.train, out, datasets={"train": train_ds, "val": val_ds})
        weights, step = final_weights(result)
        model = VideoPoetLM(model_cfg)
        model.load_state_dict(weights)
        export = save_checkpoint(out / "model", model, model_cfg,
                                 extra={"steps": step, "tokenizers": shards.meta.tokenizers,
                                        "media": shards.meta.settings, "text": to_dict(app.text)})
        if app.text.kind == "words":
            (export / WORDS_FILE).write_text(words_path.read_text())
        run.log_artifact(export, "model")
        summary = {"steps": step, "model": str(export), "fingerprint": read_metadata(export)["fingerprint"],
                   "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                   "seconds": time.perf_counter() - began}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log_artifact(out / "summary.json")
    return summary


def _parameters(cfg: LLMConfig) -> int:
    with torch.device("meta"):
        return VideoPoetLM(cfg).num_params()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet train llm", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "debug, demo, 300m, 1b, 8b")
    parser.add_argument("--data", required=True, nargs="+", help="token shards: a tokenize job's OUT or its folders")
    args = parser.parse_args(argv)
    try:
        app = app_config(LLMTrainConfig, args, {"": "train_llm", "model": "llm"})
    except (ConfigError, ValueError) as e:
        print(f"videopoet train llm: {e}", file=sys.stderr)
        return 2
    summary = train_llm(app, args.data if len(args.data) > 1 else args.data[0], args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
