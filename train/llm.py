"""`videopoet train llm`: the VideoPoet LLM on the training engine (Ray Train + DeepSpeed), trained on token shards
with the task mixture.

Data: the shards' token rows go through Ray Data to every worker, which keeps its slice (by clip id) of the compact
token rows; each step draws one task and a batch from (seed, step, rank), so a resumed run continues with exactly
the batches an uninterrupted one would have seen. Before the first step the driver checks that the shards hold the
inputs of every task the mixture draws. Validation loss per task is computed on the `val` split on every rank
together and reduced. Rank 0 logs losses per task, validation losses, tokens/s, estimated MFU, learning rate and the
padding share to MLflow.

Outputs: OUT/ray/llm (Ray Train's checkpoints) and OUT/model (the safetensors export with its config JSON, the word
vocabulary and the shards' tokenizer record), which `videopoet generate` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, local_export, read_metadata, save_checkpoint
from pipeline.config import ConfigError, from_dict, identity_json, to_dict
from pipeline.lineage import export_record
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.shards import ShardError, ShardSet, open_shards
from pipeline.storage import Busy, save_text
from pipeline.text import WORDS_FILE, TextConfig, WordVocabulary, load_text_conditioner, stack_embeddings
from pipeline.tracking import TrackingConfig
from pipeline.vocab import Vocabulary
from train.cli import app_config
from train.data import log_lineage, shard_columns, split_datasets
from train.engine import (DeepSpeedConfig, Objective, Recipe, TrainConfig, Worker, all_reduce_mean, final_weights, fit,
                          result_metrics)
from train.flops import MatmulPeak, batch_flops
from train.mixture import Mixture, MixtureConfig, Row, check_inputs, collate, rows_from_table
from train.runs import RunFolder, log_export, open_run, write_run_config, write_summary

TOKEN_COLUMNS = ["clip_id", "caption", "split", "video_tokens", "video_shape", "audio_tokens", "audio_shape",
                 "structure_tokens", "structure_shape"]


@dataclass(frozen=True)
class LLMTrainConfig:
    model: LLMConfig = field(default_factory=LLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_batches: int = 2  # per task with inputs in the val split
    # The paper's second stage: start from this LLM export's weights (fresh optimizer and schedule, this run's own
    # mixture), for task-specific adaptation. Its vocabulary, words and tokenizers must be the shards'.
    init: str = ""

    def __post_init__(self):
        if self.val_batches < 0:
            raise ValueError(f"val_batches must be >= 0, got {self.val_batches!r}")


def vocabulary_for(shards: ShardSet, text_size: int) -> Vocabulary:
    """The unified vocabulary the shards' tokenizers and the text conditioner need."""
    video = shards.meta.tokenizers["video"]["config"]
    audio = shards.meta.tokenizers.get("audio")
    levels, codes = (0, 0) if audio is None else (audio["config"]["quantizer"]["levels"],
                                                  audio["config"]["quantizer"]["codebook_size"])
    return Vocabulary(video_codes=2 ** video["quantizer"]["bits"], audio_levels=levels, audio_codes=codes,
                      text_size=text_size)


def refuse_vocab_overrides(overrides: list[str], prefix: str = "") -> None:
    """`vocabulary_for` sets the model's vocabulary from the shards, so a `--set` of `model.vocab` would be accepted
    and do nothing: it is refused, naming what does set it."""
    key = f"{prefix}model.vocab"
    for override in overrides:
        name = override.split("=", 1)[0].strip()
        if name == key or name.startswith(f"{key}."):
            raise ValueError(f"--set {override}: {key} is not a setting of this app; the vocabulary follows the "
                             "shards' tokenizers (video codebook bits, audio levels and codebook size) and the "
                             "caption words")


def available_inputs(shards: ShardSet, table) -> set[str]:
    """The task inputs some row of the shards has (see `train.mixture.needs`)."""
    available = set()
    if any(table.column("caption").to_pylist()):
        available.add("caption")
    if shards.meta.tokenizers.get("audio") and any(table.column("has_audio").to_pylist()):
        available.add("audio")
    if shards.meta.settings.get("structure"):
        available.add("structure")
    return available


def collect_rows(shard, rank: int = 0, world_size: int = 1) -> list[Row]:
    """This rank's slice of a dataset shard's token rows, ordered by clip id."""
    return rows_from_table(shard_columns(shard, TOKEN_COLUMNS, rank, world_size))


# ---------------------------------------------------------------------------------------------------- recipe

class LLMRecipe(Recipe):
    """Each draw builds one task's batch from this rank's rows; losses are summed per task over the window."""

    def __init__(self, worker: Worker):
        super().__init__(worker)
        config = worker.config
        self.app = from_dict(LLMTrainConfig, config["app"])
        self.model_cfg = from_dict(LLMConfig, config["model"])
        text = (WordVocabulary.from_json(config["words"]) if self.app.text.kind == "words"
                else load_text_conditioner(self.app.text))
        self.mixture = Mixture(self.app.mixture, self.model_cfg.vocab, text, worker.train.steps)
        self.rows = collect_rows(worker.dataset("train"), worker.rank, worker.world_size)
        if not self.rows:
            raise RuntimeError(f"rank {worker.rank}: no training rows in {config['data']}")
        # Every rank keeps all validation rows: ZeRO-3 forwards are collective, so all ranks must run the same ones.
        self.val_rows = collect_rows(worker.dataset("val"))
        self.skipped: dict[str, int] = {}
        self.peak = MatmulPeak(worker.device, worker.dtype)

    def modules(self) -> dict[str, torch.nn.Module]:
        model = VideoPoetLM(self.model_cfg)
        if self.app.init:
            model.load_state_dict(load_checkpoint(local_export(self.app.init)).state_dict())
        return {"model": Objective(model)}

    def _inputs(self, sequences, conditions):
        batch = collate(sequences)
        device = self.worker.device
        embeddings = stack_embeddings(conditions)
        inputs = (torch.from_numpy(batch["ids"]).to(device), torch.from_numpy(batch["prefix_len"]).to(device),
                  torch.from_numpy(batch["loss_mask"] > 0).to(device),
                  None if embeddings is None else embeddings.to(device))
        return batch, inputs

    def train_step(self, engines, draw: int) -> dict[str, float]:
        cfg = self.worker.train
        task, sequences, conditions = self.mixture.batch(self.rows, draw, cfg.seed, self.worker.rank,
                                                         cfg.batch_size, self.skipped)
        batch, inputs = self._inputs(sequences, conditions)
        engine = engines["model"]
        loss, stats = engine(*inputs)
        engine.backward(loss)
        engine.step()
        return {f"{task.value}.loss_sum": stats["loss_sum"].sum().item(),
                f"{task.value}.tokens": stats["tokens"].sum().item(),
                "padding_sum": float(batch["padding"]), "batches": 1.0, "tokens": float(batch["lengths"].sum()),
                "flops": batch_flops(self.model_cfg, batch)}

    def metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        tokens_per_s = sums["tokens"] / seconds * self.worker.world_size
        return {**task_losses(sums), "tokens_per_s": tokens_per_s, "padding": sums["padding_sum"] / sums["batches"],
                "mfu": sums["flops"] / seconds / self.peak.update()}

    @torch.no_grad()
    def validate(self, engines) -> dict[str, float]:
        """Loss per task on held-out rows. Every rank holds the same rows and runs the same number of forwards in the
        same task order, each on its own random batches."""
        if not self.val_rows:
            return {}
        cfg = self.worker.train
        sums: dict[str, float] = {}
        for task in self.mixture.tasks:
            usable = [r for r in self.val_rows if self.mixture.lacks(task, r) is None]
            for i in range(self.app.val_batches if usable else 0):
                rng = np.random.default_rng([cfg.seed, i, self.worker.rank, 2])
                built = [self.mixture.build(task, usable[j], rng) for j in rng.integers(len(usable),
                                                                                         size=cfg.batch_size)]
                _, inputs = self._inputs([b[0] for b in built], [b[1] for b in built])
                _, stats = engines["model"](*inputs)
                for key, value in (("loss_sum", stats["loss_sum"]), ("tokens", stats["tokens"])):
                    sums[f"{task.value}.{key}"] = sums.get(f"{task.value}.{key}", 0.0) + value.sum().item()
        keys = [f"{t.value}.{s}" for t in self.mixture.tasks for s in ("loss_sum", "tokens")]
        return task_losses(all_reduce_mean({k: sums.get(k, 0.0) for k in keys}), prefix="val_loss")

    def state(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def restore(self, state: dict[str, Any]) -> None:
        self.skipped = dict(state.get("skipped", {}))

    def finish(self, engines) -> None:
        if self.skipped:
            self.worker.tracker.log_dict(self.skipped, "skipped_rows.json")


def task_losses(sums: Mapping[str, float], prefix: str = "loss") -> dict[str, float]:
    """`<prefix>/<task>` per task and `<prefix>` over all tokens, from `<task>.loss_sum` and `<task>.tokens` sums."""
    tasks = [k.removesuffix(".loss_sum") for k in sums if k.endswith(".loss_sum")]
    losses = {f"{prefix}/{t}": sums[f"{t}.loss_sum"] / max(sums[f"{t}.tokens"], 1) for t in tasks}
    total = sum(sums[f"{t}.loss_sum"] for t in tasks)
    tokens = sum(sums[f"{t}.tokens"] for t in tasks)
    return {**losses, prefix: total / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------------- driver

def train_llm(app: LLMTrainConfig, data: str | list[str], out: str | Path, parent=None) -> dict[str, Any]:
    """Train (or resume) the LLM on shards; returns the summary also written to OUT/summary.json."""
    folder = RunFolder(out)
    shards = open_shards(data)
    init = local_export(app.init) if app.init else None
    init_meta = init_metadata(app.init, init) if init else {}  # before its words are read
    with folder.hold("llm"):
        table = shards.to_table(["caption", "has_audio"])
        check_inputs(app.mixture, available_inputs(shards, table), f"the shards {data}")
        words = folder.read_text(WORDS_FILE) if app.text.kind == "words" else ""
        if app.text.kind == "words" and words is None:
            # An adapted model keeps the pretrained model's word ids, whatever words the new captions have.
            words = ((init / WORDS_FILE).read_text() if init else
                     load_text_conditioner(app.text, table.column("caption").to_pylist()).to_json())
            folder.write_text(WORDS_FILE, words)
        text = WordVocabulary.from_json(words) if words else load_text_conditioner(app.text)
        model_cfg = replace(app.model, vocab=vocabulary_for(shards, text.text_size))
        origin = check_init(app.init, init_meta, model_cfg, shards) if init else {}
        write_run_config(folder, {**to_dict(app), "model": to_dict(model_cfg)})

        run = open_run(app, folder, "llm", parent)
        began = time.perf_counter()
        with run:
            train_ds, val_ds = split_datasets(shards, TOKEN_COLUMNS)
            run.log_params({"vocab_size": model_cfg.vocab.size, "parameters": _parameters(model_cfg),
                            "shards_fingerprint": shards.fingerprint})
            if init:
                run.set_tags(origin)
                run.log_dataset(export_record(init), "init")
            train_rows, val_rows = train_ds.count(), val_ds.count()
            run.log_metrics({"train_clips": train_rows, "val_clips": val_rows})
            log_lineage(run, shards, str(data), train_rows, val_rows)
            result = fit("llm", LLMRecipe, app, folder.location, run, {"train": train_ds, "val": val_ds},
                         model=to_dict(model_cfg), data=str(data), words=words)
            weights, step = final_weights(result)
            model = VideoPoetLM(model_cfg)
            model.load_state_dict(weights)
            with folder.export_dir("model") as export:
                save_checkpoint(export, model, model_cfg,
                                extra={"steps": step, "tokenizers": shards.meta.tokenizers,
                                       "media": shards.meta.settings, "text": to_dict(app.text), **origin})
                if words:
                    save_text(export / WORDS_FILE, words)
                fingerprint = log_export(run, export, "model")
            summary = {"steps": step, "model": folder.uri("model"), "fingerprint": fingerprint,
                       "metrics": result_metrics(result), "seconds": time.perf_counter() - began}
            write_summary(folder, run, summary)
        return summary


def init_metadata(location: str, local: Path) -> dict[str, Any]:
    """The metadata of the export `location` (`local`, its copy here); refuses a folder that is no LLM export."""
    try:
        meta = read_metadata(local)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--init {location}: {e}") from None
    if meta["kind"] != "llm":
        raise ValueError(f"--init {location}: a {meta['kind']} export, not an LLM one")
    return meta


def check_init(location: str, meta: dict[str, Any], model_cfg: LLMConfig, shards: ShardSet) -> dict[str, str]:
    """What the run records of the export it starts from (`meta`, see `init_metadata`); refuses one that does not
    fit this run, saying what differs (architecture, vocabulary, tokenizers)."""
    where = f"--init {location}"
    theirs = from_dict(LLMConfig, meta["config"])
    if theirs.vocab != model_cfg.vocab:
        raise ValueError(f"{where}: its vocabulary {to_dict(theirs.vocab)} differs from the one these shards and "
                         f"words need, {to_dict(model_cfg.vocab)}")
    if identity_json(replace(theirs, vocab=model_cfg.vocab)) != identity_json(model_cfg):
        changed = sorted(k for k, v in to_dict(model_cfg).items() if to_dict(theirs)[k] != v)
        raise ValueError(f"{where}: its model differs from this run's `model` section in {', '.join(changed)}")
    for role, tokenizer in shards.meta.tokenizers.items():
        pretrained = (meta["extra"].get("tokenizers") or {}).get(role)
        if (tokenizer or {}).get("fingerprint") != (pretrained or {}).get("fingerprint"):
            raise ValueError(f"{where}: trained on {role} tokens of tokenizer "
                             f"{(pretrained or {}).get('fingerprint')}, but these shards hold tokens of "
                             f"{(tokenizer or {}).get('fingerprint')}: codes of different tokenizers do not match")
    return {"init": location, "init_fingerprint": meta["fingerprint"]}


def _parameters(cfg: LLMConfig) -> int:
    with torch.device("meta"):
        return VideoPoetLM(cfg).num_params()


def run(args: argparse.Namespace) -> int:
    """`videopoet train llm` with its arguments parsed (`train.cli`)."""
    if args.init:
        args.overrides.append(f"init={json.dumps(args.init)}")
    try:
        refuse_vocab_overrides(args.overrides)
        app = app_config(LLMTrainConfig, args, {"": "train_llm", "model": "llm"})
        summary = train_llm(app, args.data if len(args.data) > 1 else args.data[0], args.out)
    except (ConfigError, Busy, ValueError, ShardError, FileNotFoundError) as e:
        print(f"videopoet train llm: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
