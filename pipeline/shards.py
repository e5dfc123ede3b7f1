"""Token shards: the Parquet schema (version 1), the layout of a job's output, and a reader that refuses to mix
tokenizers. Files are written with `pipeline.storage`'s atomic writers.

Layout of a tokenize job's output folder OUT:

    OUT/<fingerprint>/shard-00000.parquet          token shards and nothing else: any Parquet reader loads the folder
    OUT/__jobs/<fingerprint>/job.json              the job manifest: configs, generations, input counts, status
    OUT/__jobs/<fingerprint>/records/*.parquet     shard records (RECORD_SCHEMA), many per file
    OUT/__jobs/<fingerprint>/ids/gen-NNNNN/*.parquet   each generation's ids, sorted, with their shards
    OUT/__jobs/<fingerprint>/errors.parquet        every input that failed: source, id, stage, error_kind, message
    OUT/__jobs/lock                                who runs a job on OUT

The job's own files live under `__jobs`, a name that Parquet readers skip (pyarrow, Ray Data and Spark skip names
starting with `_` or `.`, Hugging Face `datasets` those starting with `__` or `.`), so OUT itself loads as the shards
of its tokenization. `<fingerprint>` covers everything that decides the tokens (the tokenizers' own fingerprints, the
decode settings and the optional outputs), so re-tokenizing with a new tokenizer writes a new folder and leaves the
old one untouched.

Exactly once: inputs are assigned to shards by position in the id-sorted inputs of their generation
(`tokenize_jobs.plan`), and a shard is done when its record exists and, if it has clips, its Parquet file has the
size the record gives. Each file is written atomically (`pipeline.storage.write_atomic`), the shard before its
record. A shard without clips has a record and no Parquet file, because some readers (Hugging Face `datasets`)
reject Parquet files without rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_ds
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from pipeline.storage import resolve_filesystem

SCHEMA_VERSION = 1
JOBS_DIR = "__jobs"
LEGACY_JOBS_DIR = "_jobs"  # before shard records were batched; Hugging Face `datasets` reads into it
META_KEY = b"videopoet"
FINGERPRINT_CHARS = 16
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.parquet$")
_FINGERPRINT = re.compile(rf"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$")

# Token columns come in pairs: `<name>_tokens` (flattened, row-major over the shape) and `<name>_shape`.
TOKEN_TYPES = {"video": pa.int32(), "audio": pa.int16(), "hr_video": pa.int32(), "structure": pa.int32()}


class ShardError(ValueError):
    """Shards that cannot be read together, or a file that is not a shard of this schema; names the files."""


def _token_fields(name: str, dtype: pa.DataType, nullable: bool) -> list[pa.Field]:
    return [pa.field(f"{name}_tokens", pa.list_(dtype), nullable), pa.field(f"{name}_shape", pa.list_(pa.int32()),
                                                                            nullable)]


SCHEMA = pa.schema([
    pa.field("clip_id", pa.string(), False),  # "<id>#<clip index, 5 digits>": stable across runs
    pa.field("id", pa.string(), False),  # the manifest's id (default: the source as written)
    pa.field("source", pa.string(), False),  # the path or URI as written in the manifest
    pa.field("clip_index", pa.int32(), False),
    pa.field("start", pa.float64(), False),  # seconds from the start of the source
    pa.field("end", pa.float64(), False),
    pa.field("caption", pa.string()),
    pa.field("split", pa.string()),
    pa.field("extras", pa.string()),  # JSON object of the manifest's other columns, null when there are none
    *_token_fields("video", TOKEN_TYPES["video"], False),  # (t, h, w) codes of the video tokenizer
    *_token_fields("audio", TOKEN_TYPES["audio"], True),  # (levels, frames), level-major; null without audio
    pa.field("has_audio", pa.bool_(), False),  # the source has an audio stream
    pa.field("padded_frames", pa.int32(), False),  # trailing copies of the last frame (a source shorter than a clip)
    pa.field("source_fps", pa.float64()),
    pa.field("source_width", pa.int32()),
    pa.field("source_height", pa.int32()),
    pa.field("source_duration", pa.float64()),
    *_token_fields("hr_video", TOKEN_TYPES["hr_video"], True),  # the same clip at 2x, for super-resolution
    *_token_fields("structure", TOKEN_TYPES["structure"], True),  # flow + edges video, for stylization
    pa.field("text_embeddings", pa.list_(pa.float16())),  # (positions, width) of a frozen text encoder
    pa.field("text_shape", pa.list_(pa.int32())),
])

ERRORS_SCHEMA = pa.schema([
    pa.field("source", pa.string(), False),
    pa.field("id", pa.string(), False),
    pa.field("stage", pa.string(), False),  # where it failed: decode, video_tokenizer, ...
    pa.field("error_kind", pa.string(), False),  # missing, empty, not_media, no_video, corrupt, timeout, too_short
    pa.field("message", pa.string(), False),
    pa.field("clips_kept", pa.int32(), False),  # clips decoded before the failure (a file damaged part-way)
])

# One row per finished shard (the tokenize job's RecordLog).
RECORD_SCHEMA = pa.schema([
    pa.field("index", pa.int64(), False),
    pa.field("inputs", pa.int32(), False),
    pa.field("clips", pa.int64(), False),
    pa.field("first_id", pa.string(), False),
    pa.field("last_id", pa.string(), False),
    pa.field("bytes", pa.int64(), False),  # the shard file's size (0 without clips): a file of another size is redone
    pa.field("inputs_failed", pa.int32(), False),
    pa.field("inputs_partial", pa.int32(), False),  # failed part-way, clips before the damage kept
    pa.field("errors", pa.list_(pa.struct(list(ERRORS_SCHEMA))), False),
    pa.field("truncated", pa.list_(pa.struct([pa.field("id", pa.string(), False),
                                              pa.field("source", pa.string(), False),
                                              pa.field("clips_kept", pa.int32(), False)])), False),
])


# ---------------------------------------------------------------------------------------------------- names

def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    match = _SHARD_FILE.match(posixpath.basename(name))
    return int(match.group(1)) if match else None


def fingerprint_of(tokenizers: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The folder name of a tokenization: a short hash of the tokenizers' fingerprints and the settings."""
    key = {"schema_version": SCHEMA_VERSION, "tokenizers": {k: v and v["fingerprint"] for k, v in tokenizers.items()},
           "settings": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_CHARS]


def is_fingerprint(name: str) -> bool:
    return bool(_FINGERPRINT.match(name))


# ---------------------------------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class ShardMeta:
    """What a shard file says about itself (Parquet key-value metadata `videopoet`, one JSON object)."""

    fingerprint: str
    tokenizers: dict[str, Any]  # {"video": {"fingerprint", "kind", "config"}, "audio": {...} or None}
    settings: dict[str, Any]  # decode settings and optional outputs
    shard: dict[str, Any]  # index, inputs, clips, first_id, last_id
    created: str  # ISO 8601, UTC: when the shard's generation was planned (a shard redone is the same file)
    schema_version: int = SCHEMA_VERSION

    def to_metadata(self) -> dict[bytes, bytes]:
        return {META_KEY: json.dumps(dataclasses.asdict(self), sort_keys=True).encode()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[bytes, bytes] | None, where: str) -> "ShardMeta":
        if not metadata or META_KEY not in metadata:
            raise ShardError(f"{where}: not a videopoet token shard (no '{META_KEY.decode()}' metadata)")
        data = json.loads(metadata[META_KEY])
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ShardError(f"{where}: shard schema version {data.get('schema_version')}, this code reads "
                             f"version {SCHEMA_VERSION}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------- tables

def _list_array(values: np.ndarray, dtype: pa.DataType, valid: np.ndarray | None = None) -> pa.ListArray:
    """Rows of a 2-D array as a list column; rows where `valid` is false become nulls."""
    rows, width = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, pa.int32())
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), dtype)
    mask = None if valid is None else pa.array(~np.asarray(valid, bool))
    return pa.ListArray.from_arrays(offsets, flat, type=pa.list_(dtype), mask=mask)


def _ragged_array(values: np.ndarray, lengths: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    """The first `lengths[i]` entries of each row of a zero-padded 2-D array; rows of length 0 become nulls."""
    lengths = np.asarray(lengths, np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    flat = np.concatenate([row[:n] for row, n in zip(values, lengths)]) if len(values) else values.reshape(-1)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, dtype), type=pa.list_(dtype),
                                    mask=pa.array(lengths == 0))


def _nullable(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    values = np.asarray(values, np.float64)
    return pa.array(values, pa.float64(), mask=np.isnan(values)).cast(dtype, safe=False)


def clips_table(batch: Mapping[str, Any]) -> pa.Table:
    """Decoded-and-tokenized clip rows (numpy columns as the tokenize job's stages produce them) -> SCHEMA.

    Token columns are 2-D arrays `<name>_tokens` (rows, n) and `<name>_shape` (rows, k); optional outputs that are
    absent become null columns, and audio tokens are null where `has_audio` is false. Text embeddings come
    zero-padded, `text_embeddings` (rows, max positions * width), with `text_shape` (rows, 2) giving each row's
    (positions, width); rows without text (0 positions) get nulls. Empty or missing text (caption, split, extras)
    becomes null.
    """
    rows = len(batch["clip_id"])
    has_audio = np.asarray(batch["has_audio"], bool)
    columns: dict[str, pa.Array] = {}
    if "text_embeddings" in batch:
        shapes = np.asarray(batch["text_shape"], np.int64).reshape(rows, 2)
        columns["text_embeddings"] = _ragged_array(batch["text_embeddings"], shapes.prod(1), pa.float16())
        columns["text_shape"] = _list_array(shapes, pa.int32(), shapes[:, 0] > 0)
    for field in SCHEMA:
        name = field.name
        if name in columns:
            continue
        if name.startswith("text_"):
            columns[name] = pa.nulls(rows, field.type)
        elif name.endswith(("_tokens", "_shape")):
            prefix = name.rsplit("_", 1)[0]
            if name not in batch:
                if not field.nullable:
                    raise KeyError(f"clips_table: the batch lacks the required column {name!r}")
                columns[name] = pa.nulls(rows, field.type)
                continue
            dtype = field.type.value_type
            columns[name] = _list_array(np.asarray(batch[name]), dtype, has_audio if prefix == "audio" else None)
        elif name in ("source_fps", "source_width", "source_height", "source_duration"):
            columns[name] = _nullable(batch[name], field.type)
        elif name in ("caption", "split", "extras"):
            columns[name] = pa.array([str(v) if v else None for v in batch.get(name, [None] * rows)], pa.string())
        else:
            columns[name] = pa.array(np.asarray(batch[name]).tolist(), field.type)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


# ---------------------------------------------------------------------------------------------------- reading

def read_meta(fs: pa_fs.FileSystem, path: str) -> ShardMeta:
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid) as e:
        raise ShardError(f"{path}: cannot read as Parquet: {e}") from None
    return ShardMeta.from_metadata(schema.metadata, path)


def shard_files(fs: pa_fs.FileSystem, directory: str) -> list[str]:
    """The shard files directly inside `directory`, in shard order."""
    infos = fs.get_file_info(pa_fs.FileSelector(directory, allow_not_found=True))
    files = [i.path for i in infos if i.type == pa_fs.FileType.File and shard_index(i.path) is not None]
    return sorted(files, key=lambda p: shard_index(p))


def fingerprint_dirs(fs: pa_fs.FileSystem, root: str) -> list[str]:
    """The names of the tokenization folders directly inside a job's output folder."""
    infos = fs.get_file_info(pa_fs.FileSelector(root, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos
                  if i.type == pa_fs.FileType.Directory and is_fingerprint(posixpath.basename(i.path)))


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}"


def _expand(location: str) -> tuple[pa_fs.FileSystem, list[str]]:
    """The shard files of one location: a shard file, a tokenization folder, or a job's OUT with one of them."""
    fs, path = resolve_filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pa_fs.FileType.NotFound:
        raise ShardError(f"shards: {location} does not exist")
    if info.type == pa_fs.FileType.File:
        return fs, [path]
    files = shard_files(fs, path)
    if files:
        return fs, files
    found = fingerprint_dirs(fs, path)
    if len(found) > 1:
        raise ShardError(f"shards: {location} holds {len(found)} tokenizations ({', '.join(found)}); they come from "
                         f"different tokenizers or settings and cannot be mixed: pick one, e.g. "
                         f"{_join(location, found[0])}")
    if found:
        return fs, shard_files(fs, posixpath.join(path, found[0]))
    raise ShardError(f"shards: no shard files (shard-NNNNN.parquet) under {location}")


@dataclass(frozen=True)
class ShardSet:
    """Shard files of one tokenization, checked to share a fingerprint."""

    filesystem: pa_fs.FileSystem
    files: tuple[str, ...]
    metas: tuple[ShardMeta, ...]

    @property
    def meta(self) -> ShardMeta:
        return self.metas[0]

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def clips(self) -> int:
        return sum(m.shard["clips"] for m in self.metas)

    def dataset(self) -> pa_ds.Dataset:
        return pa_ds.dataset(list(self.files), schema=SCHEMA, format="parquet", filesystem=self.filesystem)

    def to_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        return self.dataset().to_table(columns=list(columns) if columns is not None else None)


def open_shards(locations: str | Sequence[str]) -> ShardSet:
    """Open shards for reading: shard files, tokenization folders, or job output folders holding one tokenization.

    Raises ShardError when the files come from different tokenizers or settings (different fingerprints), naming
    the fingerprints and a file of each.
    """
    if isinstance(locations, str):
        locations = [locations]
    if not locations:
        raise ShardError("shards: no locations given")
    fs: pa_fs.FileSystem | None = None
    files: list[str] = []
    for location in locations:
        location_fs, found = _expand(location)
        if fs is not None and location_fs.type_name != fs.type_name:
            raise ShardError(f"shards: {location} is on a different filesystem ({location_fs.type_name}) than the "
                             f"locations before it ({fs.type_name})")
        fs = location_fs
        files += found
    metas = [read_meta(fs, f) for f in files]
    by_fingerprint: dict[str, list[str]] = {}
    for path, meta in zip(files, metas):
        by_fingerprint.setdefault(meta.fingerprint, []).append(path)
    if len(by_fingerprint) > 1:
        detail = "; ".join(f"{fp}: {len(paths)} files, e.g. {paths[0]}" for fp, paths in by_fingerprint.items())
        raise ShardError(f"shards: refusing to mix tokenizer fingerprints ({detail}); tokens of different tokenizers "
                         "or settings are not comparable")
    return ShardSet(fs, tuple(files), tuple(metas))
