"""`videopoet train sr`: a super-resolution stage on Ray Train + DeepSpeed, trained on token shards written with `--hr`.

Data: each clip's low-res codes (`video_tokens`) and the same clip's codes at twice the size (`hr_video_tokens`, same
video tokenizer), with its caption. Every worker keeps its slice (by clip id) of the training pairs; each step draws
a batch from (seed, step, rank), and the training corruptions (MAGVIT's cosine masking of the high-res codes, discrete
noise on the low-res codes, independent dropout of the low-res and text conditions, all configured in the model's
`masking`) come from a generator seeded the same way, so a resumed run continues with exactly the batches and masks an
uninterrupted one would have seen. Text is the captions' word ids (`pipeline.text.WordVocabulary`, at most
`model.text_vocab` words) or, with `text.kind = "encoder"`, a frozen encoder's embeddings of width `model.text_dim`.

Validation (loss and token accuracy on the `val` split) runs on every rank with the same number of forwards (ZeRO-3
gathers parameters collectively) and is reduced. Rank 0 logs loss, token accuracy (all k sub-tokens right, on masked
positions), per-sub-token accuracy, learning rate and high-res tokens/s to MLflow.

Outputs: OUT/ray/sr (Ray Train's sharded DeepSpeed checkpoints) and OUT/model (the consolidated safetensors export with
its config JSON, the word vocabulary and the shards' tokenizer record), which `videopoet generate --sr` reads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import read_metadata, save_checkpoint
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.generation import text_inputs
from pipeline.shards import ShardSet, open_shards
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.text import TextConditioner, TextConfig, WordVocabulary, load_text_conditioner
from pipeline.tracking import NullRun, TrackingConfig, attach
from train.data import shard_columns, split_datasets
from train.engine import DeepSpeedConfig, build_engine, final_weights, restore, save, set_lr
from train.runner import TrainConfig, add_run_arguments, all_reduce_mean, app_config, fit, init_ray, open_run, world

TOKEN_COLUMNS = ["clip_id", "caption", "split", "video_tokens", "video_shape", "hr_video_tokens", "hr_video_shape"]
WORDS_FILE = "words.json"
STATS = ("loss", "accuracy", "factor_accuracy")


@dataclass(frozen=True)
class SRTrainConfig:
    model: SuperResConfig = field(default_factory=SuperResConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_batches: int = 2


class Objective(torch.nn.Module):
    """The engine's module: its forward is the model's masked-token loss, so DeepSpeed's hooks see all of it."""

    def __init__(self, model: SuperResTransformer):
        super().__init__()
        self.model = model

    def forward(self, hr_codes, lr_codes, text=None, text_mask=None, generator=None):
        return self.model.loss(hr_codes, lr_codes, text, text_mask, generator)


# ---------------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Pair:
    """One clip's codes at both resolutions."""

    lr: np.ndarray  # (t, h, w)
    hr: np.ndarray  # (t, 2h, 2w)
    caption: str


def pairs_from_columns(columns: dict[str, list]) -> list[Pair]:
    def codes(values, shape):
        return np.asarray(values, dtype=np.int64).reshape([int(s) for s in shape])

    return [Pair(codes(lr, lr_shape), codes(hr, hr_shape), caption or "")
            for lr, lr_shape, hr, hr_shape, caption in zip(columns["video_tokens"], columns["video_shape"],
                                                            columns["hr_video_tokens"], columns["hr_video_shape"],
                                                            columns["caption"])]


def draw_batch(pairs: list[Pair], text: TextConditioner, size: int, key: list[int], device: torch.device,
               dtype: torch.dtype):
    """`size` pairs drawn from `key` and the generator of their training corruptions, as the objective's inputs;
    text embeddings in the engine's `dtype` (bf16 on GPU)."""
    rng = np.random.default_rng(key)
    picked = [pairs[i] for i in rng.integers(len(pairs), size=size)]
    hr = torch.from_numpy(np.stack([p.hr for p in picked])).to(device)
    lr = torch.from_numpy(np.stack([p.lr for p in picked])).to(device)
    words, words_mask = text_inputs(text.condition([p.caption for p in picked]), device)
    if words is not None and words.is_floating_point():
        words = words.to(dtype)
    generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
    return (hr, lr, words, words_mask), generator


def text_conditioner(app: SRTrainConfig, words_json: str) -> TextConditioner:
    return WordVocabulary.from_json(words_json) if app.text.kind == "words" else load_text_conditioner(app.text)


# ---------------------------------------------------------------------------------------------------- worker loop

def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    app = from_dict(SRTrainConfig, config["app"])
    cfg = app.train
    rank, world_size = world()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    engine = build_engine(Objective(SuperResTransformer(app.model)), cfg, app.deepspeed)
    state = restore(engine)
    start = state["step"] if state else 0
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    text = text_conditioner(app, config["words"])
    pairs = pairs_from_columns(shard_columns(ray.train.get_dataset_shard("train"), TOKEN_COLUMNS, rank, world_size))
    # Every rank keeps all validation pairs: ZeRO-3 forwards are collective, so all ranks must run the same ones.
    val_pairs = pairs_from_columns(shard_columns(ray.train.get_dataset_shard("val"), TOKEN_COLUMNS))
    if not pairs:
        raise RuntimeError(f"rank {rank}: no training clips in {config['data']}")
    tracker = attach(config["tracking_uri"], config["run_id"]) if rank == 0 else NullRun()
    tokens_per_batch = cfg.batch_size * math.prod(app.model.grid)

    sums = dict.fromkeys(STATS, 0.0)
    batches, window_began = 0, time.perf_counter()
    accumulation = app.deepspeed.gradient_accumulation_steps
    for step in range(start, cfg.steps):
        lr = set_lr(engine, step, cfg)
        for micro in range(accumulation):
            inputs, generator = draw_batch(pairs, text, cfg.batch_size, [cfg.seed, step * accumulation + micro, rank],
                                           device, dtype)
            loss, stats = engine(*inputs, generator=generator)
            engine.backward(loss)
            engine.step()
            for k in STATS:
                sums[k] += stats[k].item()
            batches += 1
        done = step + 1
        metrics: dict[str, float] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            seconds = time.perf_counter() - window_began
            reduced = all_reduce_mean({**{k: v / batches for k, v in sums.items()},
                                       "tokens_per_s": batches * tokens_per_batch / seconds})
            metrics = {**reduced, "tokens_per_s": reduced["tokens_per_s"] * world_size, "lr": lr}
            sums, batches, window_began = dict.fromkeys(STATS, 0.0), 0, time.perf_counter()
        if val_pairs and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics.update(validate(engine, val_pairs, text, app, device, dtype))
        if metrics:
            tracker.log_metrics(metrics, step=done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(engine, done, {k: v for k, v in metrics.items() if k in ("loss", "val_loss", "val_accuracy")}, {})


@torch.no_grad()
def validate(engine, pairs: list[Pair], text: TextConditioner, app: SRTrainConfig, device,
             dtype: torch.dtype) -> dict[str, float]:
    """Loss and token accuracy on held-out pairs: `val_batches` forwards on every rank, each on its own batches."""
    rank, _ = world()
    sums = dict.fromkeys(STATS, 0.0)
    engine.eval()
    for i in range(app.val_batches):
        inputs, generator = draw_batch(pairs, text, app.train.batch_size, [app.train.seed, i, rank, 2], device, dtype)
        _, stats = engine(*inputs, generator=generator)
        for k in STATS:
            sums[k] += stats[k].item() / app.val_batches
    engine.train()
    return {f"val_{k}": v for k, v in all_reduce_mean(sums).items()}


# ---------------------------------------------------------------------------------------------------- driver

def check_shards(shards: ShardSet, model: SuperResConfig) -> None:
    """The shards must hold 2x codes of the model's grids from a tokenizer with the model's code bits."""
    if not shards.meta.settings.get("hr"):
        raise ValueError(f"shards {shards.files[0]}: written without 2x tokens; tokenize with --hr")
    bits = shards.meta.tokenizers["video"]["config"]["quantizer"]["bits"]
    if bits != model.bits:
        raise ValueError(f"shards: the video tokenizer has {bits}-bit codes but model.bits = {model.bits} "
                         f"(set --set model.bits={bits})")
    table = shards.to_table(["video_shape", "hr_video_shape"]).slice(0, 1).to_pylist()
    if not table:
        raise ValueError(f"shards {shards.files[0]}: no clips")
    lr_shape, hr_shape = (tuple(table[0][k]) for k in ("video_shape", "hr_video_shape"))
    if lr_shape != model.lr_grid or hr_shape != model.grid:
        raise ValueError(f"shards: codes {lr_shape} -> {hr_shape}, but the model maps {model.lr_grid} -> {model.grid} "
                         f"(set model.grid = {list(hr_shape)} and windows that tile it)")


def prepare_text(app: SRTrainConfig, shards: ShardSet, out: Path) -> str:
    """The word vocabulary's JSON (built from the training captions once, then reused on resume), or "" for an
    encoder; checks that the model can take what the conditioner gives."""
    if app.text.kind == "encoder":
        encoder = load_text_conditioner(app.text)
        if encoder.width != app.model.text_dim:
            raise ValueError(f"text encoder {app.text.path}: width {encoder.width}, but model.text_dim = "
                             f"{app.model.text_dim}")
        return ""
    if not app.model.text_vocab:
        raise ValueError("model.text_vocab = 0 takes text as embeddings: set text.kind = 'encoder' and text.path")
    path = out / WORDS_FILE
    if not path.exists():
        captions = shards.to_table(["caption"]).column("caption").to_pylist()
        limited = TextConfig(**{**to_dict(app.text), "max_size": app.text.max_size or app.model.text_vocab})
        load_text_conditioner(limited, captions).save(path)
    words = WordVocabulary.load(path)
    if words.size > app.model.text_vocab:
        raise ValueError(f"text: {words.size} words, but model.text_vocab = {app.model.text_vocab} "
                         f"(set text.max_size <= {app.model.text_vocab})")
    return words.to_json()


def train_sr(app: SRTrainConfig, data: str | list[str], out: str | Path, parent=None) -> dict[str, Any]:
    """Train (or resume) a super-resolution stage on shards; returns the summary also written to OUT/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = open_shards(data)
    check_shards(shards, app.model)
    words = prepare_text(app, shards, out)
    (out / "config.json").write_text(json.dumps(to_dict(app), indent=2) + "\n")

    run = open_run(app, out, "sr", parent)
    began = time.perf_counter()
    init_ray()
    with run:
        train_ds, val_ds = split_datasets(shards, TOKEN_COLUMNS)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in SuperResTransformer(app.model).parameters())
        run.log_params({"parameters": parameters, "shards_fingerprint": shards.fingerprint})
        run.log_metrics({"train_clips": train_ds.count(), "val_clips": val_ds.count()})
        result = fit("sr", train_loop, {"app": to_dict(app), "data": str(data), "words": words,
                                        "tracking_uri": run.uri, "run_id": run.run_id},
                     app.train, out, datasets={"train": train_ds, "val": val_ds})
        weights, step = final_weights(result)
        model = SuperResTransformer(app.model)
        model.load_state_dict(weights)
        export = save_checkpoint(out / "model", model, app.model,
                                 extra={"steps": step, "tokenizers": shards.meta.tokenizers,
                                        "media": shards.meta.settings, "text": to_dict(app.text)})
        if words:
            (export / WORDS_FILE).write_text(words)
        run.log_artifact(export, "model")
        summary = {"steps": step, "model": str(export), "fingerprint": read_metadata(export)["fingerprint"],
                   "parameters": parameters,
                   "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                   "seconds": time.perf_counter() - began}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log_artifact(out / "summary.json")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet train sr", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--data", required=True, nargs="+", help="token shards written with --hr: a tokenize job's "
                                                                  "OUT or its folders")
    args = parser.parse_args(argv)
    try:
        app = app_config(SRTrainConfig, args, {"": "train_sr", "model": "superres"})
    except (ConfigError, ValueError) as e:
        print(f"videopoet train sr: {e}", file=sys.stderr)
        return 2
    try:
        summary = train_sr(app, args.data if len(args.data) > 1 else args.data[0], args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"videopoet train sr: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
