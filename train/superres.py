"""`videopoet train sr`: a super-resolution stage on the training engine (Ray Train + DeepSpeed), trained on token
shards written with `--hr`.

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

Outputs: OUT/ray/superres (Ray Train's checkpoints, see `train.engine`) and OUT/model (the safetensors export with its
config JSON, the word vocabulary and the shards' tokenizer record), which `videopoet generate --sr` reads.
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

from pipeline.checkpoint import save_checkpoint
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.generation import text_inputs
from pipeline.shards import ShardError, ShardSet, open_shards
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.storage import save_text
from pipeline.text import WORDS_FILE, TextConditioner, TextConfig, WordVocabulary, load_text_conditioner
from pipeline.tracking import TrackingConfig
from train.cli import app_config
from train.data import log_lineage, shard_columns, split_datasets
from pipeline.storage import Busy
from train.engine import (DeepSpeedConfig, Objective, Recipe, TrainConfig, Worker, all_reduce_mean, final_weights, fit,
                          result_metrics)
from train.runs import RunFolder, log_export, open_run, write_run_config, write_summary

TOKEN_COLUMNS = ["clip_id", "caption", "split", "video_tokens", "video_shape", "hr_video_tokens", "hr_video_shape"]
STATS = ("loss", "accuracy", "factor_accuracy")


@dataclass(frozen=True)
class SRTrainConfig:
    model: SuperResConfig = field(default_factory=SuperResConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_batches: int = 2

    def __post_init__(self):
        if self.val_batches < 0:
            raise ValueError(f"val_batches must be >= 0, got {self.val_batches!r}")


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


# ---------------------------------------------------------------------------------------------------- recipe

class SRRecipe(Recipe):
    """Each draw takes a batch of this rank's pairs and the generator of its training corruptions."""

    def __init__(self, worker: Worker):
        super().__init__(worker)
        self.app = from_dict(SRTrainConfig, worker.config["app"])
        self.text = text_conditioner(self.app, worker.config["words"])
        self.pairs = pairs_from_columns(shard_columns(worker.dataset("train"), TOKEN_COLUMNS, worker.rank,
                                                      worker.world_size))
        if not self.pairs:
            raise RuntimeError(f"rank {worker.rank}: no training clips in {worker.config['data']}")
        # Every rank keeps all validation pairs: ZeRO-3 forwards are collective, so all ranks must run the same ones.
        self.val_pairs = pairs_from_columns(shard_columns(worker.dataset("val"), TOKEN_COLUMNS))
        self.tokens_per_batch = worker.train.batch_size * math.prod(self.app.model.grid)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": Objective(SuperResTransformer(self.app.model))}

    def _batch(self, pairs: list[Pair], key: list[int]):
        w = self.worker
        return draw_batch(pairs, self.text, w.train.batch_size, key, w.device, w.dtype)

    def train_step(self, engines, draw: int) -> dict[str, float]:
        inputs, generator = self._batch(self.pairs, [self.worker.train.seed, draw, self.worker.rank])
        engine = engines["model"]
        loss, stats = engine(*inputs, generator=generator)
        engine.backward(loss)
        engine.step()
        return {**{k: stats[k].item() for k in STATS}, "batches": 1.0}

    def metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        batches = sums["batches"]
        return {**{k: sums[k] / batches for k in STATS},
                "tokens_per_s": batches * self.tokens_per_batch / seconds * self.worker.world_size}

    @torch.no_grad()
    def validate(self, engines) -> dict[str, float]:
        """Loss and token accuracy on held-out pairs: `val_batches` forwards on every rank, each on its own batches."""
        if not self.val_pairs or not self.app.val_batches:
            return {}
        sums = dict.fromkeys(STATS, 0.0)
        for i in range(self.app.val_batches):
            inputs, generator = self._batch(self.val_pairs, [self.worker.train.seed, i, self.worker.rank, 2])
            _, stats = engines["model"](*inputs, generator=generator)
            for k in STATS:
                sums[k] += stats[k].item() / self.app.val_batches
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


def prepare_text(app: SRTrainConfig, shards: ShardSet, folder: RunFolder) -> str:
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
    saved = folder.read_text(WORDS_FILE)
    if saved is None:
        captions = shards.to_table(["caption"]).column("caption").to_pylist()
        limited = TextConfig(**{**to_dict(app.text), "max_size": app.text.max_size or app.model.text_vocab})
        saved = load_text_conditioner(limited, captions).to_json()
        folder.write_text(WORDS_FILE, saved)
    words = WordVocabulary.from_json(saved)
    if words.size > app.model.text_vocab:
        raise ValueError(f"text: {words.size} words, but model.text_vocab = {app.model.text_vocab} "
                         f"(set text.max_size <= {app.model.text_vocab})")
    return words.to_json()


def train_sr(app: SRTrainConfig, data: str | list[str], out: str | Path, parent=None) -> dict[str, Any]:
    """Train (or resume) a super-resolution stage on shards; returns the summary also written to OUT/summary.json."""
    folder = RunFolder(out)
    shards = open_shards(data)
    with folder.hold("superres"):
        check_shards(shards, app.model)
        words = prepare_text(app, shards, folder)
        write_run_config(folder, to_dict(app))

        run = open_run(app, folder, "superres", parent)
        began = time.perf_counter()
        with run:
            train_ds, val_ds = split_datasets(shards, TOKEN_COLUMNS)
            with torch.device("meta"):
                parameters = sum(p.numel() for p in SuperResTransformer(app.model).parameters())
            run.log_params({"parameters": parameters, "shards_fingerprint": shards.fingerprint})
            train_rows, val_rows = train_ds.count(), val_ds.count()
            run.log_metrics({"train_clips": train_rows, "val_clips": val_rows})
            log_lineage(run, shards, str(data), train_rows, val_rows)
            result = fit("superres", SRRecipe, app, folder.location, run, {"train": train_ds, "val": val_ds},
                         data=str(data), words=words)
            weights, step = final_weights(result)
            model = SuperResTransformer(app.model)
            model.load_state_dict(weights)
            with folder.export_dir("model") as export:
                save_checkpoint(export, model, app.model,
                                extra={"steps": step, "tokenizers": shards.meta.tokenizers,
                                       "media": shards.meta.settings, "text": to_dict(app.text)})
                if words:
                    save_text(export / WORDS_FILE, words)
                fingerprint = log_export(run, export, "model")
            summary = {"steps": step, "model": folder.uri("model"), "fingerprint": fingerprint,
                       "parameters": parameters, "metrics": result_metrics(result),
                       "seconds": time.perf_counter() - began}
            write_summary(folder, run, summary)
        return summary


def run(args: argparse.Namespace) -> int:
    """`videopoet train sr` with its arguments parsed (`train.cli`)."""
    try:
        app = app_config(SRTrainConfig, args, {"": "train_sr", "model": "superres"})
        summary = train_sr(app, args.data if len(args.data) > 1 else args.data[0], args.out)
    except (ConfigError, Busy, ValueError, ShardError, FileNotFoundError) as e:
        print(f"videopoet train sr: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
