"""`videopoet tokenize`: a corpus manifest -> versioned Parquet token shards, exactly once, on Ray Data.

    videopoet tokenize --manifest M --out OUT --video-tokenizer CKPT [--audio-tokenizer CKPT] [--config demo]

Streaming pipeline: manifest rows -> decode (CPU actors, `pipeline.media` through ffmpeg) -> [2x split, structure
video] -> video tokenizer actors -> [audio tokenizer actors] -> [text encoder actors] -> the driver, which assembles
shards and writes each one as soon as all its inputs are through. Tokenizer actors run on GPUs (bf16; video actors
take most of a GPU each, audio and text actors a share) when the cluster has them, on CPUs otherwise. Nothing is
materialized whole: Ray Data backpressures the stages and the driver holds only the shards still open, which are
those whose inputs are in flight.

Exactly once: the manifest is sorted by id and shard k holds inputs [k * n, (k + 1) * n); finished shards are
skipped, so re-running the same command after a crash (even SIGKILL) yields the same clips as an uninterrupted run
(see `pipeline.shards` for the layout and the atomic writes). `--max-error-fraction` fails the job (exit code 1) when
too many inputs failed; every failure is a row of `errors.parquet` either way. Works the same on a laptop (embedded
Ray) and under `ray job submit` (joins RAY_ADDRESS), with OUT and the manifest on any pyarrow filesystem URI.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import posixpath
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import torch

from cluster import init_ray
from pipeline.checkpoint import model_classes
from pipeline.config import ConfigError, from_dict, load_config, to_dict
from pipeline.manifest import ManifestError, read_manifest
from pipeline.media import LIMIT_FIELDS, MediaConfig
from pipeline.shards import (JOBS_DIR, ShardError, ShardMeta, clips_table, errors_table, fingerprint_of,
                             record_index, record_name, shard_index, shard_name)
from pipeline.storage import (Busy, UnsafeUri, exclusive, is_uri, owner_record, parquet_readable, read_json, redact,
                              redact_values, remove_temporaries, resolve_filesystem, write_json, write_table)
from pipeline.tracking import TrackingConfig, start_run
from tokenize_jobs.stages import (AudioTokenizer, Decode, TextEncoder, VideoTokenizer, add_structure,
                                  checkpoint_metadata, downscale_2x, text_encoder_metadata)

MANIFEST_COLUMNS = ("id", "path", "source", "caption", "split")
MAX_INPUT_BLOCKS = 4096  # manifest rows go to Ray in at most this many blocks, whatever the corpus size
SIDE_GPU_SHARE = 0.25  # with GPUs, audio and text actors share a GPU with video actors (their models are smaller)


class TokenizeError(ValueError):
    """A job that cannot run as asked (inputs, tokenizers, or an OUT written by a different job); names the input."""


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class TokenizeConfig:
    media: MediaConfig = field(default_factory=lambda: MediaConfig(height=64, width=64))
    inputs_per_shard: int = 64
    decode_actors: int = 2  # most decode actors
    decode_cpus: float = 0.5  # per decode actor: a logical share for Ray's scheduler (ffmpeg runs beside it)
    batch_size: int = 8  # clips per tokenizer call
    tokenizer_cpus: float = 1.0  # per video tokenizer actor without GPUs (also its torch threads)
    side_cpus: float = 0.5  # per audio tokenizer or text encoder actor without GPUs
    tokenizer_actors: int = 1  # most actors per tokenizer stage without GPUs; with GPUs, one per GPU
    max_error_fraction: float = 0.1  # of inputs that fail; above it the job exits 1
    hr: bool = False  # also tokenize each clip at 2x (decoded at 2x; the base frames are its 2x2 means)
    structure: bool = False  # also tokenize the structure video (flow + luminance), for stylization
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))

    def __post_init__(self):
        for name in ("inputs_per_shard", "decode_actors", "batch_size", "tokenizer_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenizeConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("decode_cpus", "tokenizer_cpus", "side_cpus"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TokenizeConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"TokenizeConfig.max_error_fraction must lie in [0, 1], got {self.max_error_fraction!r}")

    @property
    def decode_media(self) -> MediaConfig:
        """The decode settings: twice the size when the 2x tokens are wanted."""
        if not self.hr:
            return self.media
        return replace(self.media, height=2 * self.media.height, width=2 * self.media.width)


# ---------------------------------------------------------------------------------------------------- helpers

def _tokenizer(location: str, kind: str, role: str) -> dict[str, Any]:
    """What the shards record about a tokenizer; checks the checkpoint is of the kind the stage expects."""
    try:
        meta = checkpoint_metadata(location)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TokenizeError(f"--{role}-tokenizer {location}: {e}") from None
    if meta.get("kind") != kind:
        raise TokenizeError(f"--{role}-tokenizer {location}: a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    return {"fingerprint": meta["fingerprint"], "kind": kind, "config": meta["config"], "location": location}


def _text_encoder(location: str) -> dict[str, Any]:
    try:
        return {**text_encoder_metadata(location), "location": location}
    except (FileNotFoundError, OSError) as e:
        raise TokenizeError(f"--text-encoder {location}: {e}") from None


def _config(tokenizer: dict[str, Any]) -> Any:
    config_class, _ = model_classes(tokenizer["kind"])
    return from_dict(config_class, tokenizer["config"])


def _meta_model(tokenizer: dict[str, Any]) -> torch.nn.Module:
    """The tokenizer's architecture without weights, to check shapes up front."""
    _, model_class = model_classes(tokenizer["kind"])
    with torch.device("meta"):
        return model_class(_config(tokenizer))


def _extras(table: pa.Table) -> pa.Array:
    """The manifest's other columns of each row as one JSON object (null when there are none)."""
    others = [c for c in table.column_names if c not in MANIFEST_COLUMNS]
    if not others:
        return pa.nulls(len(table), pa.string())
    rows = table.select(others).to_pylist()
    return pa.array([json.dumps(row, sort_keys=True, default=str) for row in rows], pa.string())


class ShardAssembler:
    """Collects clip rows per shard and hands a shard over once every one of its inputs is complete.

    Rows arrive in any order and an input's rows are split across batches (they stream); the rows of its last
    batch carry `input_rows`, the number of rows the input produced (0 on the others), so completion is a count.
    """

    def __init__(self, inputs_per_shard: dict[int, int]):
        self.expected = dict(inputs_per_shard)
        self.complete_inputs: collections.Counter[int] = collections.Counter()
        self.rows_seen: collections.Counter[str] = collections.Counter()
        self.rows_total: dict[str, int] = {}
        self.parts: dict[int, list[dict[str, np.ndarray]]] = collections.defaultdict(list)

    @property
    def open_shards(self) -> list[int]:
        return sorted(s for s, n in self.expected.items() if self.complete_inputs[s] < n)

    def add(self, batch: dict[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
        shards = np.asarray(batch["shard"])
        for shard in np.unique(shards):
            rows = shards == shard
            self.parts[int(shard)].append({k: np.asarray(v)[rows] for k, v in batch.items()})
        touched = set()
        for key, shard, total in zip(batch["id"], shards, batch["input_rows"]):
            self.rows_seen[key] += 1
            if total:
                self.rows_total[key] = int(total)
            if self.rows_seen[key] == self.rows_total.get(key):
                del self.rows_seen[key], self.rows_total[key]
                self.complete_inputs[int(shard)] += 1
                touched.add(int(shard))
        complete = []
        for shard in sorted(s for s in touched if self.complete_inputs[s] == self.expected[s]):
            parts = self.parts.pop(shard)
            complete.append((shard, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
        return complete


# ---------------------------------------------------------------------------------------------------- the job

class TokenizeJob:
    """One tokenization of one manifest into OUT/<fingerprint>; `run()` is idempotent and resumes."""

    def __init__(self, cfg: TokenizeConfig, manifest: str, out: str, video_tokenizer: str,
                 audio_tokenizer: Optional[str] = None, text_encoder: Optional[str] = None):
        self.cfg = cfg
        self.manifest = str(manifest)
        self.out = str(out)
        self.tokenizers = {"video": _tokenizer(video_tokenizer, "magvit", "video"),
                           "audio": _tokenizer(audio_tokenizer, "soundstream", "audio") if audio_tokenizer else None,
                           "text": _text_encoder(text_encoder) if text_encoder else None}
        self._check_tokenizers()
        media = {k: v for k, v in to_dict(cfg.media).items() if k not in LIMIT_FIELDS}  # limits do not change tokens
        self.settings = {"media": media, "hr": cfg.hr, "structure": cfg.structure}
        self.fingerprint = fingerprint_of(self.tokenizers, self.settings)
        self.fs, root = resolve_filesystem(self.out)
        self.shard_dir = posixpath.join(root, self.fingerprint)
        self.job_dir = posixpath.join(root, JOBS_DIR, self.fingerprint)
        self.job_file = posixpath.join(self.job_dir, "job.json")
        self.lock_file = posixpath.join(root, JOBS_DIR, "lock")

    def shard_path(self, index: int) -> str:
        return posixpath.join(self.shard_dir, shard_name(index))

    def record_path(self, index: int) -> str:
        return posixpath.join(self.job_dir, "shards", record_name(index))

    def _check_tokenizers(self) -> None:
        media = self.cfg.media
        video = _meta_model(self.tokenizers["video"])
        sizes = [(media.height, media.width)] + ([(2 * media.height, 2 * media.width)] if self.cfg.hr else [])
        for height, width in sizes:
            try:
                video.latent_shape(media.clip_frames, height, width)
            except ValueError as e:
                raise TokenizeError(f"--video-tokenizer {self.tokenizers['video']['location']} cannot take "
                                    f"{media.clip_frames}x{height}x{width} clips: {e}") from None
        if self.tokenizers["audio"] is not None:
            audio = _config(self.tokenizers["audio"])
            location = self.tokenizers["audio"]["location"]
            if audio.sample_rate != media.sample_rate:
                raise TokenizeError(f"--audio-tokenizer {location}: trained at {audio.sample_rate} Hz, clips are "
                                    f"decoded at media.sample_rate = {media.sample_rate} Hz")
            if audio.quantizer.codebook_size > np.iinfo(np.int16).max + 1:
                raise TokenizeError(f"--audio-tokenizer {location}: {audio.quantizer.codebook_size} codes do not "
                                    "fit int16")
            if media.clip_samples < math.prod(audio.strides):
                raise TokenizeError(f"--audio-tokenizer {location}: clips of {media.clip_samples} samples are "
                                    f"shorter than one audio frame ({math.prod(audio.strides)} samples)")

    # ------------------------------------------------------------------------------------------------ plan

    def plan(self) -> pa.Table:
        """The manifest sorted by id, with each row's shard and its carried columns (split, extras)."""
        try:
            table = read_manifest(self.manifest)
        except ManifestError as e:
            raise TokenizeError(str(e)) from None
        if len(table) == 0:
            raise TokenizeError(f"manifest {self.manifest} has no rows")
        table = table.sort_by("id")
        split = (table.column("split").cast(pa.string()) if "split" in table.column_names
                 else pa.nulls(len(table), pa.string()))
        shard = pa.array(np.arange(len(table)) // self.cfg.inputs_per_shard, pa.int64())
        return pa.table({"id": table.column("id"), "path": table.column("path"), "source": table.column("source"),
                         "caption": table.column("caption"), "split": split, "extras": _extras(table),
                         "shard": shard})

    def _job_record(self, plan: pa.Table) -> dict[str, Any]:
        ids = hashlib.sha256("\n".join(plan.column("id").to_pylist()).encode()).hexdigest()
        return redact_values({"fingerprint": self.fingerprint, "tokenizers": self.tokenizers,
                              "settings": self.settings, "config": to_dict(self.cfg), "manifest": self.manifest,
                              "inputs": len(plan), "ids_sha256": ids, "inputs_per_shard": self.cfg.inputs_per_shard,
                              "shards": self.shard_count(plan)})

    def shard_count(self, plan: pa.Table) -> int:
        return -(-len(plan) // self.cfg.inputs_per_shard)

    def _claim(self, plan: pa.Table) -> dict[str, Any]:
        """Write job.json for a fresh OUT, or check that the OUT being resumed was planned the same way."""
        record = self._job_record(plan)
        previous = read_json(self.fs, self.job_file)
        if previous is not None:
            for key in ("ids_sha256", "inputs_per_shard"):
                if previous[key] != record[key]:
                    raise TokenizeError(
                        f"--out {self.out}: {self.fingerprint} was started with a different "
                        f"{'manifest' if key == 'ids_sha256' else 'inputs_per_shard'} ({previous['inputs']} inputs, "
                        f"{previous['inputs_per_shard']} per shard; now {record['inputs']} and "
                        f"{record['inputs_per_shard']}); shards map inputs by position, so resuming would mix them: "
                        "use another --out")
        write_json(self.fs, self.job_file, {**record, "status": "running", "updated": _now()})
        return record

    def finished_shards(self) -> set[int]:
        """Shards whose record exists and, if they have clips, whose file does too and ends in a Parquet footer that
        reads (two listings, a footer read per file, and a read of each record without a file, to tell a shard
        without clips from one killed between its two writes). A shard cut short, however it got there, is redone."""
        recorded = self._listed(posixpath.join(self.job_dir, "shards"), record_index)
        written = sorted(recorded & self._listed(self.shard_dir, shard_index))
        unwritten = sorted(recorded - set(written))
        empty = {i for i, r in zip(unwritten, self._read_records(unwritten)) if r["clips"] == 0}
        with ThreadPoolExecutor(max_workers=16) as pool:  # on object stores each footer is a round trip
            readable = pool.map(lambda i: parquet_readable(self.fs, self.shard_path(i)), written)
            return {i for i, ok in zip(written, readable) if ok} | empty

    def _listed(self, directory: str, index_of) -> set[int]:
        infos = self.fs.get_file_info(pa_fs.FileSelector(directory, allow_not_found=True))
        return {index_of(i.path) for i in infos if i.type == pa_fs.FileType.File and index_of(i.path) is not None}

    def _read_records(self, indices: list[int]) -> list[dict[str, Any]]:
        # Threads: on object stores each read is a round trip.
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda i: read_json(self.fs, self.record_path(i)), indices))

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Tokenize what is not done yet, holding OUT: a second job on the same OUT is refused (Busy), so neither
        deletes the other's temporaries."""
        plan = self.plan()
        owner = owner_record(job="tokenize", fingerprint=self.fingerprint, manifest=redact(self.manifest))
        with exclusive(self.fs, self.lock_file, owner, f"--out {redact(self.out)}"):
            return self._run(plan)

    def _run(self, plan: pa.Table) -> dict[str, Any]:
        record = self._claim(plan)
        removed = remove_temporaries(self.fs, self.shard_dir) + remove_temporaries(self.fs, self.job_dir)
        done = self.finished_shards()
        pending = plan.filter(pc.invert(pc.is_in(plan.column("shard"), pa.array(sorted(done), pa.int64()))))
        began = time.perf_counter()
        written = self.process(pending) if len(pending) else []
        seconds = time.perf_counter() - began
        summary = self.finish(record, plan)
        clips_now = sum(n for _, n in written)
        summary.update(shards_written=len(written), shards_skipped=len(done), temporaries_removed=removed,
                       clips_this_run=clips_now, seconds=round(seconds, 3),
                       clips_per_s=round(clips_now / seconds, 3) if written else 0.0)
        return summary

    def output_columns(self) -> list[tuple[str, str]]:
        """(frame column, token name) pairs the video tokenizer stage reads and writes."""
        return [("frames", "video")] + ([("frames_hr", "hr_video")] if self.cfg.hr else []) + \
            ([("structure", "structure")] if self.cfg.structure else [])

    def decode(self, pending: pa.Table):
        """Manifest rows -> clip rows (frames, audio and the carried columns), as a Ray dataset."""
        import ray

        cfg = self.cfg
        transforms = ([downscale_2x] if cfg.hr else []) + ([add_structure] if cfg.structure else [])
        ds = ray.data.from_arrow(pending, override_num_blocks=min(len(pending), MAX_INPUT_BLOCKS))
        # Decode runs in its own actor pool: Ray Data would fuse decode tasks into the tokenizer actors (same
        # resources), which serializes decoding behind tokenizing.
        return ds.map_batches(Decode, fn_constructor_args=(cfg.decode_media, transforms), batch_size=1,
                              batch_format="numpy", num_cpus=cfg.decode_cpus,
                              compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.decode_actors))

    def tokenize(self, clips):
        """Clip rows -> token rows: the tokenizer stages as actor pools, on GPUs when the cluster has them."""
        import ray

        cfg = self.cfg
        gpus = int(ray.cluster_resources().get("GPU", 0))
        audio, text = self.tokenizers["audio"], self.tokenizers["text"]
        cpu = {"num_cpus": cfg.tokenizer_cpus}
        video_share = 1 - SIDE_GPU_SHARE * ((audio is not None) + (text is not None))
        actors = ray.data.ActorPoolStrategy(min_size=1, max_size=gpus or cfg.tokenizer_actors)
        ds = clips.map_batches(VideoTokenizer, fn_constructor_args=(self.tokenizers["video"]["location"],
                                                                   self.output_columns()),
                               batch_size=cfg.batch_size, batch_format="numpy", compute=actors,
                               **({"num_gpus": video_share} if gpus else cpu))
        side = {"num_gpus": SIDE_GPU_SHARE} if gpus else {"num_cpus": cfg.side_cpus}
        if audio is None:
            ds = ds.drop_columns(["audio"])
        else:
            ds = ds.map_batches(AudioTokenizer, fn_constructor_args=(audio["location"],), batch_size=cfg.batch_size,
                                batch_format="numpy", compute=actors, **side)
        if text is not None:
            ds = ds.map_batches(TextEncoder, fn_constructor_args=(text["location"],), batch_size=cfg.batch_size,
                                batch_format="numpy", compute=actors, **side)
        return ds

    def process(self, pending: pa.Table) -> list[tuple[int, int]]:
        """Tokenize the pending inputs and write their shards; returns (shard, clips) per shard written."""
        init_ray()
        counts = collections.Counter(pending.column("shard").to_pylist())
        assembler = ShardAssembler(counts)
        bounds = self._shard_bounds(pending)
        written = []
        for batch in self.tokenize(self.decode(pending)).iter_batches(batch_size=None, batch_format="numpy"):
            for shard, rows in assembler.add(batch):
                written.append((shard, self.write_shard(shard, rows, counts[shard], bounds[shard])))
        if assembler.open_shards:
            raise RuntimeError(f"tokenize: the pipeline ended with shards {assembler.open_shards} incomplete")
        return written

    @staticmethod
    def _shard_bounds(pending: pa.Table) -> dict[int, tuple[str, str]]:
        bounds: dict[int, tuple[str, str]] = {}
        for shard, key in zip(pending.column("shard").to_pylist(), pending.column("id").to_pylist()):
            first, _ = bounds.get(shard, (key, key))
            bounds[shard] = (first, key)
        return bounds

    def write_shard(self, index: int, rows: dict[str, np.ndarray], inputs: int, bounds: tuple[str, str]) -> int:
        """Write shard `index`: its record (counts, failed and truncated inputs) first, then its clips; returns the
        clip count."""
        ok = np.asarray(rows["ok"], bool)
        kept = collections.Counter(rows["id"][ok].tolist())
        errors = [{"source": str(rows["source"][i]), "id": str(rows["id"][i]), "stage": "decode",
                   "error_kind": str(rows["error_kind"][i]), "message": str(rows["error_message"][i]),
                   "clips_kept": kept[rows["id"][i]]} for i in np.flatnonzero(~ok)]
        errors.sort(key=lambda e: e["id"])
        cut = {str(rows["id"][i]): str(rows["source"][i]) for i in np.flatnonzero(rows["truncated"])}
        truncated = [{"id": key, "source": source, "clips_kept": kept[key]} for key, source in sorted(cut.items())]
        clips = clips_table({k: v[ok] for k, v in rows.items()})
        clips = clips.take(pc.sort_indices(clips, [("clip_id", "ascending")]))
        shard = {"index": index, "inputs": inputs, "clips": len(clips), "first_id": bounds[0], "last_id": bounds[1]}
        record = {**shard, "file": shard_name(index) if len(clips) else None, "errors": errors,
                  "inputs_failed": sum(e["clips_kept"] == 0 for e in errors),
                  "inputs_partial": sum(e["clips_kept"] > 0 for e in errors), "truncated": truncated}
        write_json(self.fs, self.record_path(index), record)
        if len(clips):
            meta = ShardMeta(self.fingerprint, redact_values(self.tokenizers), self.settings, shard, _now())
            write_table(self.fs, self.shard_path(index), clips, meta.to_metadata())
        return len(clips)

    def finish(self, record: dict[str, Any], plan: pa.Table) -> dict[str, Any]:
        """Gather the shard records into errors.parquet and job.json; returns the job's summary."""
        records = self._read_records(list(range(record["shards"])))
        errors = [e for r in records for e in r["errors"]]
        write_table(self.fs, posixpath.join(self.job_dir, "errors.parquet"), errors_table(errors))
        failed = len(errors)
        fraction = failed / len(plan)
        status = "done" if fraction <= self.cfg.max_error_fraction else "failed"
        totals = {"inputs": len(plan), "inputs_ok": len(plan) - failed, "inputs_failed": failed,
                  "inputs_partial": sum(r["inputs_partial"] for r in records),
                  # records written before `truncated` existed have none
                  "inputs_truncated": sum(len(r.get("truncated", [])) for r in records),
                  "clips": sum(r["clips"] for r in records), "shards": len(records),
                  "shards_with_clips": sum(r["clips"] > 0 for r in records), "error_fraction": round(fraction, 4),
                  "errors_by_kind": dict(sorted(collections.Counter(e["error_kind"] for e in errors).items()))}
        write_json(self.fs, self.job_file, {**record, **totals, "status": status, "updated": _now()})
        return {"status": status, "fingerprint": self.fingerprint,
                "out": redact(posixpath.join(self.out, self.fingerprint)),
                "max_error_fraction": self.cfg.max_error_fraction, **totals}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------- CLI

def _track(cfg: TokenizeConfig, out: str, summary: dict[str, Any], parent_run_id: Optional[str]) -> None:
    if is_uri(out) and not cfg.tracking.uri:
        raise TokenizeError("tracking: --out is a URI, so the embedded MLflow store has no local folder; "
                            "set tracking.uri")
    run = start_run(cfg.tracking, posixpath.join(out, JOBS_DIR), "tokenize", parent_run_id=parent_run_id)
    try:
        run.log_params(to_dict(cfg))
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_dict(summary, "summary.json")
    finally:
        run.finish("FINISHED" if summary["status"] == "done" else "FAILED")


def format_summary(summary: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in summary["errors_by_kind"].items()) or "none"
    return (f"tokenize {summary['status']}: {summary['clips']} clips from {summary['inputs']} inputs "
            f"({summary['inputs_ok']} ok, {summary['inputs_failed']} failed, {summary['inputs_partial']} of them kept "
            f"clips before the damage; errors: {kinds}; {summary['inputs_truncated']} cut at media.max_clips) in "
            f"{summary['shards']} shards "
            f"({summary['shards_written']} written, {summary['shards_skipped']} already done); "
            f"{summary['clips_this_run']} clips in {summary['seconds']:.1f} s = {summary['clips_per_s']:.2f} clips/s "
            f"-> {summary['out']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet tokenize", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSONL, CSV, Parquet, HF folder; or URI)")
    parser.add_argument("--out", required=True, help="output folder or URI; shards go to OUT/<fingerprint>/")
    parser.add_argument("--video-tokenizer", required=True, help="MAGVIT checkpoint folder (or URI)")
    parser.add_argument("--audio-tokenizer", help="SoundStream checkpoint folder (or URI); without it no audio tokens")
    parser.add_argument("--config", default="demo", help="flavor (debug, demo, paper) or a TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set media.max_clips=4 or --set batch_size=16")
    parser.add_argument("--inputs-per-shard", type=int, help="inputs per shard (inputs_per_shard)")
    parser.add_argument("--max-error-fraction", type=float, help="fail the job above this share of failed inputs")
    parser.add_argument("--text-encoder", help="frozen text encoder folder (pipeline.text): also write caption "
                                               "embeddings")
    parser.add_argument("--hr", action="store_true", help="also write 2x video tokens, for super-resolution")
    parser.add_argument("--structure", action="store_true", help="also write structure-video tokens, for stylization")
    parser.add_argument("--tracking-uri", help="log the summary to this MLflow tracking URI")
    parser.add_argument("--track", action="store_true", help="log the summary to MLflow in OUT/_jobs/mlflow.db")
    parser.add_argument("--parent-run-id", help="log as a child run of this MLflow run")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in ((args.inputs_per_shard, "inputs_per_shard"), (args.max_error_fraction, "max_error_fraction")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    overrides += [f"{key}=true" for key in ("hr", "structure") if getattr(args, key)]
    if args.tracking_uri or args.track or args.parent_run_id:
        overrides.append("tracking.enabled=true")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={json.dumps(args.tracking_uri)}")
    try:
        cfg = load_config(TokenizeConfig, args.config, overrides, kind="tokenize")
    except (ConfigError, ValueError) as e:
        print(f"videopoet tokenize: {e}", file=sys.stderr)
        return 2
    try:
        job = TokenizeJob(cfg, args.manifest, args.out, args.video_tokenizer, args.audio_tokenizer,
                          args.text_encoder)
        summary = job.run()
        if cfg.tracking.enabled:
            _track(cfg, args.out, summary, args.parent_run_id)
    except (TokenizeError, ShardError, UnsafeUri, Busy) as e:
        print(f"videopoet tokenize: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    if summary["status"] != "done":
        print(f"videopoet tokenize: {summary['inputs_failed']} of {summary['inputs']} inputs failed "
              f"({summary['error_fraction']:.1%}), above --max-error-fraction {cfg.max_error_fraction:.1%}; "
              f"see {redact(posixpath.join(args.out, JOBS_DIR, summary['fingerprint'], 'errors.parquet'))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
