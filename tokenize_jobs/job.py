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
(see `pipeline.shards` for the layout and the atomic writes). A manifest that grew (every earlier row plus new ones,
in any order) tokenizes only its new inputs, as a new generation of shards after the existing ones
(`tokenize_jobs.plan`, which also plans corpora of any size in bounded driver memory). `--max-error-fraction` fails
the job (exit code 1) when too many inputs failed; every failure is a row of `errors.parquet` either way, and the
first few are named on the console. Works the same on a laptop (embedded Ray) and under `ray job submit` (joins
RAY_ADDRESS), with OUT and the manifest on any pyarrow filesystem URI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import posixpath
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import torch

from cluster import init_ray
from pipeline.checkpoint import model_classes
from pipeline.config import ConfigError, from_dict, load_config, to_dict
from pipeline.lineage import corpus_record, tokenization_record, tokenizer_records
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.media import LIMIT_FIELDS, MediaConfig
from pipeline.shards import (ERRORS_SCHEMA, JOBS_DIR, LEGACY_JOBS_DIR, RECORD_SCHEMA, ShardError, ShardMeta,
                             clips_table, fingerprint_of, shard_index, shard_name)
from pipeline.structure import KIND as STRUCTURE_KIND
from pipeline.storage import (Busy, NotAFolder, UnsafeUri, Unreachable, check_folder, exclusive, open_atomic,
                              owner_record, read_json, redact, redact_values, remove_temporaries, resolve_filesystem,
                              write_json, write_table)
from pipeline.tracking import TrackingConfig, check_store, start_run
from tokenize_jobs.plan import Generation, Plan, PlanError, Planner, WorkSource, shard_inputs
from tokenize_jobs.stages import (AudioTokenizer, Decode, TextEncoder, VideoTokenizer, add_structure,
                                  checkpoint_metadata, downscale_2x, text_encoder_metadata)

READ_CONCURRENCY = 2  # work parts read at once (reads take no CPU, so Ray would otherwise start them all)
EXAMPLES = 5  # failed inputs named on the console
MESSAGE_CHARS = 200  # of each one's message
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
    plan_memory_mb: int = 256  # manifest rows sorted in memory at a time by the planner (its peak: about twice)
    record_flush_s: float = 30.0  # shard records are written together at most this often (0: after every shard)
    hr: bool = False  # also tokenize each clip at 2x (decoded at 2x; the base frames are its 2x2 means)
    structure: bool = False  # also tokenize the structure video (flow + edges), for stylization
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(enabled=False))

    def __post_init__(self):
        for name in ("inputs_per_shard", "decode_actors", "batch_size", "tokenizer_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenizeConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.plan_memory_mb < 16:
            raise ValueError(f"TokenizeConfig.plan_memory_mb must be >= 16, got {self.plan_memory_mb!r}")
        if not self.record_flush_s >= 0:
            raise ValueError(f"TokenizeConfig.record_flush_s must be >= 0, got {self.record_flush_s!r}")
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


class ShardAssembler:
    """Collects clip rows per shard and hands a shard over once every one of its inputs is complete.

    Rows arrive in any order and an input's rows are split across batches (they stream); the rows of its last
    batch carry `input_rows`, the number of rows the input produced (0 on the others), so completion is a count.
    `inputs_of(shard)` is how many inputs a shard holds. Memory holds the shards with rows in flight only.
    """

    def __init__(self, inputs_of: Callable[[int], int]):
        self.inputs_of = inputs_of
        self.complete_inputs: collections.Counter[int] = collections.Counter()
        self.rows_seen: collections.Counter[str] = collections.Counter()
        self.rows_total: dict[str, int] = {}
        self.parts: dict[int, list[dict[str, np.ndarray]]] = collections.defaultdict(list)

    @property
    def open_shards(self) -> list[int]:
        return sorted(self.parts)

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
        for shard in sorted(s for s in touched if self.complete_inputs[s] == self.inputs_of(s)):
            parts = self.parts.pop(shard)
            del self.complete_inputs[shard]
            complete.append((shard, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
        return complete


class RecordLog:
    """Shard records, written to OUT/__jobs/<fingerprint>/records/ together: one Parquet file per `flush_s`
    seconds (and one at the end), so that reading every record back costs a few requests, not one per shard.

    A record is written after its shard's file and names the file's size; a run killed before a flush loses the
    records of at most `flush_s` seconds, whose shards the next run redoes (into the same bytes). File names sort
    by the time of the run that wrote them, then by sequence: a later record of a shard replaces an earlier one.
    """

    def __init__(self, fs: pa_fs.FileSystem, folder: str, flush_s: float):
        self.fs, self.folder, self.flush_s = fs, folder, flush_s
        self.stamp = _stamp()
        self.pending: list[dict[str, Any]] = []
        self.oldest = 0.0
        self.files = 0

    def add(self, record: dict[str, Any]) -> None:
        if not self.pending:
            self.oldest = time.monotonic()
        self.pending.append(record)
        if time.monotonic() - self.oldest >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            path = posixpath.join(self.folder, f"{self.stamp}-{self.files:06d}.parquet")
            write_table(self.fs, path, pa.Table.from_pylist(self.pending, schema=RECORD_SCHEMA))
            self.files += 1
            self.pending = []


def cpu_shortfall(cfg: TokenizeConfig, audio: bool, text: bool, cpus: float) -> str | None:
    """Said when a CPU cluster of `cpus` cannot hold one actor of each pool, with which Ray would wait silently;
    None when they fit."""
    needs = {"decode": cfg.decode_cpus, "video tokenizer": cfg.tokenizer_cpus,
             **({"audio tokenizer": cfg.side_cpus} if audio else {}),
             **({"text encoder": cfg.side_cpus} if text else {})}
    if sum(needs.values()) <= cpus:
        return None
    parts = ", ".join(f"{name} {n:g}" for name, n in needs.items())
    return (f"tokenize: one actor per pool needs {sum(needs.values()):g} CPUs ({parts}) and the cluster has {cpus:g}: "
            "the job waits until nodes join (an autoscaler adds them); otherwise add a node or lower decode_cpus, "
            "tokenizer_cpus or side_cpus")


def record_files(fs: pa_fs.FileSystem, folder: str) -> list[str]:
    """The record files of a tokenization, oldest first (one listing)."""
    infos = fs.get_file_info(pa_fs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pa_fs.FileType.File and i.path.endswith(".parquet"))


def read_records(fs: pa_fs.FileSystem, files: list[str], columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
    """Every shard's latest record, a file at a time (newest first), read 16 files at once (on object stores each
    is a round trip)."""
    seen: set[int] = set()

    def read(path: str) -> pa.Table:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=columns, schema=RECORD_SCHEMA)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for table in pool.map(read, files[::-1]):
            index = table.column("index").to_numpy()
            _, first = np.unique(index, return_index=True)  # a compaction crashed half-way leaves copies
            keep = np.zeros(len(index), bool)
            keep[first] = True
            keep &= ~np.isin(index, np.fromiter(seen, np.int64, len(seen)))
            seen.update(index[keep].tolist())
            yield table.filter(pa.array(keep))


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
        self.settings = {"media": media, "hr": cfg.hr, "structure": STRUCTURE_KIND if cfg.structure else False}
        self.fingerprint = fingerprint_of(self.tokenizers, self.settings)
        self.fs, root = resolve_filesystem(check_folder(self.out))
        self.shard_dir = posixpath.join(root, self.fingerprint)
        self.job_dir = posixpath.join(root, JOBS_DIR, self.fingerprint)
        self.job_file = posixpath.join(self.job_dir, "job.json")
        self.lock_file = posixpath.join(root, JOBS_DIR, "lock")
        self.legacy_job_dir = posixpath.join(root, LEGACY_JOBS_DIR, self.fingerprint)

    def shard_path(self, index: int) -> str:
        return posixpath.join(self.shard_dir, shard_name(index))

    @property
    def records_dir(self) -> str:
        return posixpath.join(self.job_dir, "records")

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

    def plan(self, folder: str, generations: list[Generation] = (), done: np.ndarray = np.empty(0, np.int64)) -> Plan:
        """Plan the manifest against the recorded `generations` (`tokenize_jobs.plan`), with runs and work parts in
        the local `folder`; `done` holds the shards already written."""
        planner = Planner(self.fs, self.job_dir, self.cfg.inputs_per_shard, self.cfg.plan_memory_mb << 20, folder)
        try:
            return planner.plan(self.manifest, list(generations), done, _now())
        except PlanError as e:
            raise TokenizeError(str(e)) from None

    def _previous(self) -> Optional[dict[str, Any]]:
        """The job record of this tokenization in OUT, checked to fit this run."""
        if self.fs.get_file_info(posixpath.join(self.legacy_job_dir, "job.json")).type == pa_fs.FileType.File:
            raise TokenizeError(
                f"--out {redact(self.out)}: {self.fingerprint} was started by an earlier version of the tokenize job "
                f"(records in {LEGACY_JOBS_DIR}/, one file per shard), which this version does not resume; its shards "
                f"stay readable: tokenize into another --out")
        previous = read_json(self.fs, self.job_file)
        if previous is not None and previous["inputs_per_shard"] != self.cfg.inputs_per_shard:
            raise TokenizeError(
                f"--out {redact(self.out)}: {self.fingerprint} was started with inputs_per_shard = "
                f"{previous['inputs_per_shard']} (now {self.cfg.inputs_per_shard}); shards map inputs by position, "
                "so resuming would mix them: use the same inputs_per_shard, or another --out")
        return previous

    def _job_record(self, generations: list[Generation]) -> dict[str, Any]:
        return redact_values({"fingerprint": self.fingerprint, "tokenizers": self.tokenizers,
                              "settings": self.settings, "config": to_dict(self.cfg), "manifest": self.manifest,
                              "inputs_per_shard": self.cfg.inputs_per_shard,
                              "generations": [g.to_dict() for g in generations],
                              "inputs": sum(g.inputs for g in generations),
                              "shards": sum(g.shards for g in generations)})

    def finished_shards(self, shards: int) -> np.ndarray:
        """The indices (below `shards`) of the shards whose latest record exists and, if they have clips, whose file
        has the size the record gives: one listing of the shards, one of the records and a read of each record
        file. A shard cut short, however it got there, is redone."""
        sizes = np.full(shards, -1, np.int64)
        for info in self.fs.get_file_info(pa_fs.FileSelector(self.shard_dir, allow_not_found=True)):
            index = shard_index(info.path)
            if index is not None and index < shards and info.type == pa_fs.FileType.File:
                sizes[index] = info.size
        done = []
        for table in read_records(self.fs, record_files(self.fs, self.records_dir), ["index", "clips", "bytes"]):
            index, clips, size = (table.column(c).to_numpy() for c in ("index", "clips", "bytes"))
            inside = index < shards
            index, clips, size = index[inside], clips[inside], size[inside]
            done.append(index[(clips == 0) | (sizes[index] == size)])
        return np.sort(np.concatenate(done)) if done else np.empty(0, np.int64)

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        """Tokenize what is not done yet, holding OUT: a second job on the same OUT is refused (Busy), so neither
        deletes the other's temporaries."""
        owner = owner_record(job="tokenize", fingerprint=self.fingerprint, manifest=redact(self.manifest))
        with exclusive(self.fs, self.lock_file, owner, f"--out {redact(self.out)}"):
            return self._run()

    def _run(self) -> dict[str, Any]:
        previous = self._previous()
        generations = [Generation.from_dict(g) for g in previous["generations"]] if previous else []
        removed = remove_temporaries(self.fs, self.shard_dir) + remove_temporaries(self.fs, self.job_dir)
        done = self.finished_shards(sum(g.shards for g in generations))
        with tempfile.TemporaryDirectory(prefix="videopoet-plan-") as folder:
            plan = self.plan(folder, generations, done)
            record = self._job_record(plan.generations)
            write_json(self.fs, self.job_file, {**(previous or {}), **record, "status": "running", "updated": _now()})
            began = time.perf_counter()
            written = self.process(plan) if plan.work else []
            seconds = time.perf_counter() - began
        summary = self.finish(record, plan.generations)
        clips_now = sum(n for _, n in written)
        summary.update(inputs_new=plan.new_inputs, generations=len(plan.generations), shards_written=len(written),
                       shards_skipped=len(done), temporaries_removed=removed, clips_this_run=clips_now,
                       seconds=round(seconds, 3), clips_per_s=round(clips_now / seconds, 3) if written else 0.0)
        return summary

    def output_columns(self) -> list[tuple[str, str]]:
        """(frame column, token name) pairs the video tokenizer stage reads and writes."""
        return [("frames", "video")] + ([("frames_hr", "hr_video")] if self.cfg.hr else []) + \
            ([("structure", "structure")] if self.cfg.structure else [])

    def decode(self, work: list[tuple[str, int]]):
        """Work rows (`Plan.work`) -> clip rows (frames, audio and the carried columns), as a Ray dataset."""
        import ray

        cfg = self.cfg
        transforms = ([downscale_2x] if cfg.hr else []) + ([add_structure] if cfg.structure else [])
        # One block per input (split inside the read tasks: a repartition would need CPUs that the actors hold).
        ds = ray.data.read_datasource(WorkSource(work), num_cpus=0, concurrency=READ_CONCURRENCY,
                                      override_num_blocks=sum(rows for _, rows in work))
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
        if not gpus and (short := cpu_shortfall(cfg, audio is not None, text is not None,
                                                ray.cluster_resources().get("CPU", 0))):
            print(short, file=sys.stderr, flush=True)
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

    def process(self, plan: Plan) -> list[tuple[int, int]]:
        """Tokenize the plan's work and write its shards; returns (shard, clips) per shard written."""
        init_ray()
        generations = plan.generations
        firsts = [g.first_shard for g in generations]
        assembler = ShardAssembler(lambda s: shard_inputs(generations, self.cfg.inputs_per_shard, s))
        records = RecordLog(self.fs, self.records_dir, self.cfg.record_flush_s)
        written = []
        try:
            for batch in self.tokenize(self.decode(plan.work)).iter_batches(batch_size=None, batch_format="numpy"):
                for shard, rows in assembler.add(batch):
                    generation = generations[int(np.searchsorted(firsts, shard, side="right")) - 1]
                    clips = self.write_shard(shard, rows, assembler.inputs_of(shard), generation.created, records)
                    written.append((shard, clips))
        finally:
            records.flush()  # the records of every shard written, even when the pipeline failed
        if assembler.open_shards or len(written) != plan.pending_shards:
            raise RuntimeError(f"tokenize: the pipeline ended with {len(written)} of {plan.pending_shards} shards "
                               f"written (shards {assembler.open_shards[:10]} incomplete)")
        return written

    def write_shard(self, index: int, rows: dict[str, np.ndarray], inputs: int, created: str,
                    records: RecordLog) -> int:
        """Write shard `index`, then hand its record (counts, size, failed and truncated inputs) to `records`;
        returns the clip count. `created` is its generation's: a shard redone is the same file."""
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
        ids = [str(key) for key in rows["id"]]  # every input has a row: its clips, or its error
        shard = {"index": index, "inputs": inputs, "clips": len(clips), "first_id": min(ids), "last_id": max(ids)}
        size = 0
        if len(clips):
            meta = ShardMeta(self.fingerprint, redact_values(self.tokenizers), self.settings, shard, created)
            size = write_table(self.fs, self.shard_path(index), clips, meta.to_metadata())
        records.add({**shard, "bytes": size, "errors": errors,
                     "inputs_failed": sum(e["clips_kept"] == 0 for e in errors),
                     "inputs_partial": sum(e["clips_kept"] > 0 for e in errors), "truncated": truncated})
        return len(clips)

    def finish(self, record: dict[str, Any], generations: list[Generation]) -> dict[str, Any]:
        """Gather the shard records, a file at a time, into errors.parquet, job.json and one compacted record file;
        returns the job's summary."""
        inputs = sum(g.inputs for g in generations)
        files = record_files(self.fs, self.records_dir)
        counts = collections.Counter()
        kinds: collections.Counter[str] = collections.Counter()
        examples: list[dict[str, Any]] = []
        compacted = posixpath.join(self.records_dir, f"{_stamp()}-compacted.parquet")
        with contextlib.ExitStack() as stack:  # writers close (footers) before their files are published
            errors = stack.enter_context(pq.ParquetWriter(stack.enter_context(open_atomic(self.fs, self.errors_path)),
                                                          ERRORS_SCHEMA))
            merged = (stack.enter_context(pq.ParquetWriter(stack.enter_context(open_atomic(self.fs, compacted)),
                                                           RECORD_SCHEMA)) if len(files) > 1 else None)
            for table in read_records(self.fs, files):
                flat = pc.list_flatten(table.column("errors"))
                failed = pa.Table.from_batches([pa.RecordBatch.from_struct_array(c) for c in flat.chunks],
                                               schema=ERRORS_SCHEMA)
                errors.write_table(failed)
                if merged is not None:
                    merged.write_table(table)
                kinds.update(failed.column("error_kind").to_pylist())
                examples = _first(examples + _examples(table), EXAMPLES)
                counts.update(shards=len(table), failed=len(failed), clips=pc.sum(table.column("clips")).as_py() or 0,
                              partial=pc.sum(table.column("inputs_partial")).as_py() or 0,
                              truncated=pc.sum(pc.list_value_length(table.column("truncated"))).as_py() or 0,
                              shards_with_clips=pc.sum(pc.greater(table.column("clips"), 0)).as_py() or 0)
        for path in files if len(files) > 1 else []:
            self.fs.delete_file(path)
        fraction = counts["failed"] / inputs
        status = "done" if fraction <= self.cfg.max_error_fraction else "failed"
        totals = {"inputs": inputs, "inputs_ok": inputs - counts["failed"], "inputs_failed": counts["failed"],
                  "inputs_partial": counts["partial"], "inputs_truncated": counts["truncated"],
                  "clips": counts["clips"], "shards": counts["shards"],
                  "shards_with_clips": counts["shards_with_clips"], "error_fraction": round(fraction, 4),
                  "errors_by_kind": dict(sorted(kinds.items()))}
        write_json(self.fs, self.job_file, {**record, **totals, "status": status, "updated": _now()})
        return {"status": status, "fingerprint": self.fingerprint,
                "out": redact(posixpath.join(self.out, self.fingerprint)),
                "errors": redact(posixpath.join(self.out, JOBS_DIR, self.fingerprint, "errors.parquet")),
                "failed_examples": examples, "max_error_fraction": self.cfg.max_error_fraction,
                "ids_sha256": [g.ids_sha256 for g in generations], **totals}

    @property
    def errors_path(self) -> str:
        return posixpath.join(self.job_dir, "errors.parquet")

    def log_lineage(self, run: Any, summary: dict[str, Any]) -> None:
        """What the job read and wrote, as the MLflow dataset inputs of its run `run`: the corpus (context `source`,
        digest from its ids), the tokenizers (`video_tokenizer`, `audio_tokenizer`) and the shards (`output`, digest =
        the fingerprint, which training runs record as their `train` and `val` inputs)."""
        run.log_dataset(corpus_record(self.manifest, summary["ids_sha256"],
                                      summary["inputs"], MANIFEST_SCHEMA), "source")
        for role, record in tokenizer_records(self.tokenizers).items():
            run.log_dataset(record, f"{role}_tokenizer")
        run.log_dataset(tokenization_record(self.fingerprint, posixpath.join(self.out, self.fingerprint),
                                            summary["clips"]), "output")
        run.set_tags({"videopoet.shards_fingerprint": self.fingerprint})


def _examples(records: pa.Table) -> list[dict[str, Any]]:
    """The failed inputs of the first shards with failures in a table of records, with their shard index."""
    failing = records.filter(pc.greater(pc.list_value_length(records.column("errors")), 0))
    first = failing.take(pc.sort_indices(failing, [("index", "ascending")])).slice(0, EXAMPLES)
    return [{"shard": r["index"], **e} for r in first.select(["index", "errors"]).to_pylist() for e in r["errors"]]


def _first(examples: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return sorted(examples, key=lambda e: (e["shard"], e["id"]))[:n]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stamp() -> str:
    """A name prefix that sorts by time, unique to its run."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------- CLI

def _track(job: TokenizeJob, summary: dict[str, Any], parent_run_id: Optional[str]) -> None:
    cfg, out = job.cfg, job.out
    run = start_run(cfg.tracking, posixpath.join(out, JOBS_DIR), "tokenize", parent_run_id=parent_run_id)
    try:
        run.log_params(to_dict(cfg))
        run.log_metrics(summary_metrics(summary))
        job.log_lineage(run, summary)
        run.log_dict(summary, "summary.json")
    finally:
        run.finish("FINISHED" if summary["status"] == "done" else "FAILED")


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_summary(summary: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in summary["errors_by_kind"].items()) or "none"
    lines = [f"tokenize {summary['status']}: {summary['clips']} clips from {summary['inputs']} inputs "
             f"({summary['inputs_ok']} ok, {summary['inputs_failed']} failed, {summary['inputs_partial']} of them kept "
             f"clips before the damage; errors: {kinds}; {summary['inputs_truncated']} cut at media.max_clips; "
             f"{summary['inputs_new']} new in this run, in {summary['generations']} generation"
             f"{'s' if summary['generations'] > 1 else ''}) in "
             f"{summary['shards']} shards "
             f"({summary['shards_written']} written, {summary['shards_skipped']} already done); "
             f"{summary['clips_this_run']} clips in {summary['seconds']:.1f} s = {summary['clips_per_s']:.2f} clips/s "
             f"-> {summary['out']}"]
    for e in summary["failed_examples"]:
        message = e["message"] if len(e["message"]) <= MESSAGE_CHARS else e["message"][:MESSAGE_CHARS] + "..."
        lines.append(f"  failed: {e['source']}: {e['error_kind']}: {message}")
    rest = summary["inputs_failed"] - len(summary["failed_examples"])
    if summary["inputs_failed"]:
        lines.append(f"  {f'... and {rest} more; ' if rest else ''}every failed input: {summary['errors']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`videopoet tokenize` with its arguments parsed (`tokenize_jobs.cli`)."""
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
        check_store(cfg.tracking, args.out)
    except (ConfigError, ValueError) as e:
        print(f"videopoet tokenize: {e}", file=sys.stderr)
        return 2
    try:
        job = TokenizeJob(cfg, args.manifest, args.out, args.video_tokenizer, args.audio_tokenizer,
                          args.text_encoder)
        summary = job.run()
        if cfg.tracking.enabled:
            _track(job, summary, args.parent_run_id)
    except (TokenizeError, ShardError, UnsafeUri, NotAFolder, Unreachable, Busy) as e:
        print(f"videopoet tokenize: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    if summary["status"] != "done":
        print(f"videopoet tokenize: {summary['inputs_failed']} of {summary['inputs']} inputs failed "
              f"({summary['error_fraction']:.1%}), above --max-error-fraction {cfg.max_error_fraction:.1%}; "
              f"see {summary['errors']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # `python -m tokenize_jobs.job`, as under `ray job submit`
    from tokenize_jobs.cli import tokenize

    raise SystemExit(tokenize())
