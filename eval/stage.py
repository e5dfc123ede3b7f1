"""`videopoet eval`: sample a trained LLM and measure the samples on Ray Data; numbers, plots and videos to MLflow.

    videopoet eval --checkpoint runs/llm --prompts synthetic --real corpus/manifest.jsonl --out runs/eval
    videopoet eval --checkpoint runs/llm --prompts fairness --out runs/fairness --config paper
    videopoet eval --checkpoint runs/llm --prompts prompts.jsonl --out runs/eval --parent-run RUN_ID

--prompts: a JSONL file of {task, prompt, attributes, video}, a text file of text-to-video prompts (one a line), or
a built-in set: `fairness` (the paper's 306 prompts x 8 samples) or `synthetic` (the synthetic world's 48 captions,
once per task of `synthetic_tasks`). --real: a corpus manifest whose clips are FVD's reference set.

Pipeline: sample rows -> Generate actors (the LLM and its tokenizers) -> [real clips, decoded at the model's clip
settings] -> Features actors (I3D, CLIP similarity, CLIP zero-shot and oracle classifiers) -> the driver. With GPUs in
the cluster a Generate and a Features actor share each GPU and run their networks there in bf16 autocast (the protocols
say so); otherwise they run on CPUs in float32. The driver streams rows into OUT/samples.parquet, accumulates I3D
feature statistics, and reduces the rows to OUT/metrics.json (FVD, CLIPSIM, fairness statistics, prompt adherence and
audio-visual agreement, each next to its protocol), OUT/plots and a few OUT/samples MP4s. All of it goes to an MLflow
run: nested under the training run with --parent-run (in that run's tracking store: --tracking-uri, or the one the
checkpoint's mlflow_run.json records), else its own run in OUT/mlflow.db. Without I3D or CLIP weights files the networks
are random-init, and every output says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster import gpu_count
from eval.actors import Features, Generate, decode_real, is_random
from eval.clip_score import ClipConfig
from eval.fairness import ATTRIBUTE_PROMPTS
from eval.fvd import FeatureStats
from eval.i3d import I3DConfig
from eval.prompts import PromptSet, load_prompts, sample_rows
from eval.report import clipsim, fairness, flat_metrics, fvd, jsonable, oracle, plot_attributes, plot_samples, \
    protocols
from pipeline.checkpoint import read_metadata
from pipeline.config import from_dict, load_config, to_json
from pipeline.ffmpeg import MediaError
from pipeline.generation import SamplingConfig, model_dir
from pipeline.lineage import export_record, manifest_record, prompts_record
from pipeline.manifest import read_manifest
from pipeline.media import MediaConfig, write_video
from pipeline.sequence import Task
from pipeline.storage import check_folder, save_text, staged_folder
from pipeline.synth import ATTRIBUTES
from pipeline.tracking import RUN_FILE, TrackingConfig, attach, check_store, start_run

# With GPUs, a Generate and a Features actor share each GPU: the I3D and CLIP networks are small next to the LLM.
GENERATE_GPU_SHARE = 0.75
FEATURE_GPU_SHARE = 0.25
MAX_INPUT_BLOCKS = 1024
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class EvalConfig:
    i3d: I3DConfig = field(default_factory=I3DConfig)  # no weights: random-init, labelled so everywhere
    clip: ClipConfig = field(default_factory=ClipConfig)  # no weights: random-init, labelled so everywhere
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # sample i is drawn with seed + i
    samples_per_prompt: int = 1  # prompt files and the synthetic set; the fairness set takes the paper's 8
    max_samples: int = 0  # only the first N samples (0: all); --samples
    synthetic_tasks: tuple[str, ...] = ("text_to_video", "video_to_audio", "audio_to_video")
    real_clips_per_video: int = 1
    covariance: Literal["unbiased", "biased"] = "unbiased"  # FVD's covariance convention
    init_seed: int = 0  # of random-init I3D and CLIP weights
    bootstrap: int = 1000  # resamples for the fairness intervals (and permutations for the synonym shift)
    media_samples: int = 4  # the first samples, written as MP4s and drawn in the frame grid
    generators: int = 1  # most Generate actors without GPUs; with GPUs one per GPU
    feature_actors: int = 1  # most Features actors without GPUs; with GPUs one per GPU
    generate_cpus: float = 1.0  # logical CPUs per actor without GPUs (Ray's scheduling, and torch's threads)
    generate_batch_size: int = 16  # samples per Generate call; those of one task decode as one batch
    feature_cpus: float = 1.0
    decode_cpus: float = 0.5  # per real-clip decode task
    feature_batch_size: int = 4  # clips per Features call (i3d.batch_size and clip.batch_size split it further)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        for name in ("samples_per_prompt", "real_clips_per_video", "bootstrap", "generators", "feature_actors",
                     "generate_batch_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("max_samples", "media_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("generate_cpus", "feature_cpus", "decode_cpus"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EvalConfig.{name} must be > 0, got {getattr(self, name)!r}")
        tasks = [t.value for t in Task]
        bad = [t for t in self.synthetic_tasks if t not in tasks]
        if bad or not self.synthetic_tasks:
            raise ValueError(f"EvalConfig.synthetic_tasks: expected tasks among {tasks}, got "
                             f"{list(self.synthetic_tasks)}")


# ---------------------------------------------------------------------------------------------------- samples table

def _schema() -> pa.Schema:
    text = pa.string()
    return pa.schema(
        [("id", text), ("source", text), ("prompt_id", pa.int64()), ("task", text), ("prompt", text),
         ("seed", pa.int64()), ("path", text), ("ok", pa.bool_()), ("error", text)]
        + [(f"expected_{a}", text) for a in ATTRIBUTES]
        + [("clip_similarity", pa.float64()), ("clip_score", pa.float64())]
        + [(f"clip_{a}", text) for a in ATTRIBUTE_PROMPTS]
        + [(f"oracle_{m}_{a}", text) for m in ("video", "audio") for a in ATTRIBUTES]
        + [("oracle_match", pa.bool_()), ("i3d_features", pa.list_(pa.float64()))])


SCHEMA = _schema()


def samples_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A Features batch -> Parquet rows, with null where a value does not apply ("", -1, NaN, no features)."""
    expected = np.array([all(batch[f"expected_{a}"][i] for a in ATTRIBUTES) for i in range(len(batch["id"]))])
    columns = {}
    for f in SCHEMA:
        values = batch[f.name]
        if f.name == "i3d_features":
            columns[f.name] = [None if len(v) == 0 else np.asarray(v, np.float64) for v in values]
        elif f.name == "oracle_match":
            columns[f.name] = [bool(v) if e else None for v, e in zip(values, expected)]
        elif f.type == pa.string():
            columns[f.name] = [str(v) if v else None for v in values]
        elif f.type == pa.int64():
            columns[f.name] = [int(v) if v >= 0 else None for v in values]
        elif f.type == pa.float64():
            columns[f.name] = [None if np.isnan(v) else float(v) for v in values]
        else:
            columns[f.name] = [bool(v) for v in values]
    return pa.table(columns, schema=SCHEMA)


class Collector:
    """Streams Features batches into samples.parquet and per-source I3D statistics; keeps the scalar rows (for the
    report) and the frames of the rows marked `keep_media`."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, SCHEMA)
        self.rows: list[dict[str, Any]] = []
        self.stats: dict[str, FeatureStats] = {}
        self.media: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        table = samples_table(batch)
        self.writer.write_table(table)
        for source in ("generated", "real"):
            features = [np.asarray(f) for f, s in zip(batch["i3d_features"], batch["source"]) if s == source
                        and len(f)]
            if features:
                stats = self.stats.setdefault(source, FeatureStats(len(features[0])))
                stats.update(np.stack(features))
        rows = table.drop_columns(["i3d_features"]).to_pylist()
        self.rows += rows
        self.media += [(row, batch["frames"][i], batch["audio"][i]) for i, row in enumerate(rows)
                       if batch["keep_media"][i] and row["ok"]]

    def close(self) -> None:
        self.writer.close()
        self.rows.sort(key=lambda row: row["id"])
        self.media.sort(key=lambda item: item[0]["id"])


# ---------------------------------------------------------------------------------------------------- pipeline

def export_media(model: Path) -> MediaConfig:
    """The clip settings of an LLM export (those its training shards were decoded at)."""
    meta = read_metadata(model)
    extra = meta.get("extra", {})
    if meta["kind"] != "llm" or "media" not in extra or not extra.get("tokenizers"):
        raise ValueError(f"--checkpoint {model}: not an LLM export of `videopoet train llm` (kind {meta['kind']!r}, "
                         f"or no media or tokenizer record)")
    return from_dict(MediaConfig, extra["media"]["media"])


def pipeline(cfg: EvalConfig, model: Path, media: MediaConfig, rows: list[dict[str, Any]],
             real: Optional[pa.Table]):
    """The Ray dataset of Features rows: generated samples, then (interleaved) the real clips."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))

    def actors(most: int, cpus: float, gpu_share: float) -> dict[str, Any]:
        resources = {"num_gpus": gpu_share} if gpus else {"num_cpus": cpus}
        return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=gpus or most), **resources}

    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(Generate, fn_constructor_args=(str(model), cfg.sampling), batch_size=cfg.generate_batch_size,
                        batch_format="numpy", **actors(cfg.generators, cfg.generate_cpus, GENERATE_GPU_SHARE))
    if real is not None:
        clips = ray.data.from_arrow(real, override_num_blocks=min(len(real), MAX_INPUT_BLOCKS))
        ds = ds.union(clips.map_batches(decode_real, fn_kwargs={"media": media,
                                                                "clips_per_video": cfg.real_clips_per_video},
                                        batch_size=1, batch_format="numpy", num_cpus=cfg.decode_cpus))
    return ds.map_batches(Features, fn_constructor_args=(cfg.i3d, cfg.clip, cfg.init_seed, media.sample_rate),
                          batch_size=cfg.feature_batch_size, batch_format="numpy",
                          **actors(cfg.feature_actors, cfg.feature_cpus, FEATURE_GPU_SHARE))


def write_media(collector: Collector, media: MediaConfig, out: Path) -> list[Path]:
    """The kept samples as MP4s (with their audio) and the frame grid; returns the files written."""
    folder = out / "samples"
    folder.mkdir(exist_ok=True)
    written = []
    for row, frames, audio in collector.media:
        path = folder / f"{row['id']}_{row['task']}.mp4"
        write_video(str(path), frames, media.fps, audio if len(audio) else None, media.sample_rate)
        written.append(path)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    if collector.media:
        plot_samples([(row, frames) for row, frames, _ in collector.media], plots / "samples.png")
    return written


def _samples_summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    count = {(source, ok): 0 for source in ("generated", "real") for ok in (True, False)}
    for row in rows:
        count[row["source"], row["ok"]] += 1
    return {"generated": count["generated", True], "generated_failed": count["generated", False],
            "real": count["real", True], "real_failed": count["real", False]}


def run_eval(cfg: EvalConfig, checkpoint: str | Path, prompts: str, out: str | Path, parent=None,
             real: Optional[str] = None) -> dict[str, Any]:
    """Generate for `prompts` from the LLM run `checkpoint` and evaluate; returns the report (OUT/metrics.json).

    out: a local folder or an object-store URI (the files are written locally, then uploaded, metrics.json last).
    parent: a `pipeline.tracking.Run` (the training or demo run) to nest this stage's run under.
    """
    location = str(out)
    if parent is None:
        check_store(cfg.tracking, location)
    check_folder(location)
    with staged_folder(location, last=(METRICS_FILE,)) as folder:
        return _evaluate(cfg, checkpoint, prompts, folder, parent, real)


def _evaluate(cfg: EvalConfig, checkpoint: str | Path, prompts: str, out: Path, parent,
              real: Optional[str]) -> dict[str, Any]:
    began = time.perf_counter()
    model = model_dir(str(checkpoint))
    media = export_media(model)
    prompt_set: PromptSet = load_prompts(prompts, cfg.samples_per_prompt, cfg.synthetic_tasks)
    rows = sample_rows(prompt_set, cfg.max_samples, cfg.sampling.seed, cfg.media_samples)
    manifest = read_manifest(real).select(["id", "path", "caption"]) if real else None
    random = is_random(cfg.i3d, cfg.clip)
    gpus = gpu_count()  # starts or joins Ray; with GPUs the actors take GPU shares and run in bf16
    texts = protocols(cfg.i3d, cfg.clip, media, cfg.covariance, random, cfg.init_seed, gpu=gpus > 0)
    labels = {"clip": " (RANDOM-INIT CLIP)" if random["clip"] else "", "oracle": ""}
    save_text(out / "eval_config.json", to_json(cfg) + "\n")

    run = parent.child("eval", cfg) if parent is not None else start_run(cfg.tracking, out, "eval", params=cfg)
    with run:
        run.log_params({"checkpoint": str(model), "prompts": prompt_set.name, "real": real or ""})
        run.set_tags({"eval.i3d_weights": "random-init" if random["i3d"] else cfg.i3d.weights,
                      "eval.clip_weights": "random-init" if random["clip"] else cfg.clip.weights or cfg.clip.model,
                      "eval.prompts": prompt_set.name})
        run.log_dataset(export_record(model), "model")
        run.log_dataset(prompts_record(prompt_set.name, prompt_set.prompts), "prompts")
        if manifest is not None:
            run.log_dataset(manifest_record(real, manifest), "reference")
        collector = Collector(out / "samples.parquet")
        try:
            for batch in pipeline(cfg, model, media, rows, manifest).iter_batches(batch_size=None,
                                                                                  batch_format="numpy"):
                collector.add(batch)
        finally:
            collector.close()
        samples = write_media(collector, media, out)
        report = {
            "checkpoint": str(model), "prompts": prompt_set.name, "real": real, "random_init": random, "gpus": gpus,
            "samples": _samples_summary(collector.rows),
            "errors": [{"id": r["id"], "error": r["error"]} for r in collector.rows if not r["ok"]][:20],
            "protocol": texts,
            "fvd": {**fvd(collector.stats.get("generated"), collector.stats.get("real"), cfg.covariance),
                    "protocol": texts["fvd"]},
            "clipsim": {**clipsim(collector.rows), "protocol": texts["clipsim"]},
            "fairness": {"attributes": fairness(collector.rows, prompt_set, cfg.bootstrap, cfg.init_seed),
                         "protocol": texts["fairness"]},
            "oracle": {**oracle(collector.rows), "protocol": texts["oracle"]},
        }
        if report["fairness"]["attributes"]:
            plot_attributes(report["fairness"]["attributes"], out / "plots" / "attributes.png", labels)
        report["seconds"] = time.perf_counter() - began
        report["run_id"], report["tracking_uri"] = run.run_id, run.uri
        save_text(out / METRICS_FILE, json.dumps(jsonable(report), indent=2) + "\n")
        run.log_metrics({**flat_metrics(report), "seconds": report["seconds"]})
        for path in (out / METRICS_FILE, out / "samples.parquet", out / "eval_config.json"):
            run.log_artifact(path)
        run.log_artifact(out / "plots", "plots")
        for path in samples:
            run.log_artifact(path, "samples")
    return report


# ---------------------------------------------------------------------------------------------------- CLI

def _parent_run(run_id: str, uri: str, checkpoint: str):
    """The training run to nest under, in its tracking store: `uri`, or the one the run folder's mlflow_run.json
    records."""
    from mlflow.exceptions import MlflowException

    if not uri:
        records = [folder / RUN_FILE for folder in (Path(checkpoint), Path(checkpoint).parent)
                   if (folder / RUN_FILE).is_file()]
        if not records:
            raise ValueError(f"--parent-run {run_id}: give --tracking-uri (no {RUN_FILE} beside the checkpoint "
                             f"records the training run's tracking store)")
        uri = json.loads(records[0].read_text())["uri"]
    parent = attach(uri, run_id)
    try:
        parent.experiment_id
    except MlflowException as e:
        raise ValueError(f"--parent-run {run_id}: no such run in {uri} ({e.message})") from None
    return parent


def run(args: argparse.Namespace) -> int:
    """`videopoet eval` with its arguments parsed (`eval.cli`)."""
    overrides = list(args.overrides)
    if args.samples is not None:
        overrides.append(f"max_samples={args.samples}")
    try:
        cfg = load_config(EvalConfig, args.config, overrides, kind="eval")
    except ValueError as e:  # ConfigError included: a bad file, key, type or value
        print(f"videopoet eval: {e}", file=sys.stderr)
        return 2
    cfg = replace(cfg, tracking=replace(cfg.tracking, uri=args.tracking_uri or cfg.tracking.uri,
                                        enabled=cfg.tracking.enabled and not args.no_tracking))
    try:
        parent = None
        if args.parent_run and cfg.tracking.enabled:
            parent = _parent_run(args.parent_run, cfg.tracking.uri, args.checkpoint)
        report = run_eval(cfg, args.checkpoint, args.prompts, args.out, parent, args.real)
    except (ValueError, FileNotFoundError, MediaError) as e:
        print(f"videopoet eval: {e}", file=sys.stderr)
        return 2
    summary = {"out": args.out, "fvd": report["fvd"]["value"], "clipsim": report["clipsim"].get("generated", {}),
               "samples": report["samples"], "random_init": report["random_init"], "run_id": report["run_id"]}
    print(json.dumps(jsonable(summary)))
    return 0

