"""What MLflow records of the data a run read or produced (`pipeline.tracking.DatasetRecord`), for each kind of data
the pipeline passes along: corpus manifests, token shards and model exports.

Digests identify content, so a researcher can follow one through runs: a manifest by the hash of its sorted ids, a
tokenization's shards by their fingerprint (which hashes the tokenizers' fingerprints and the decode settings), an
export by its weights fingerprint. Locations are recorded with credentials redacted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa

from pipeline.checkpoint import read_metadata
from pipeline.shards import ShardSet
from pipeline.storage import redact
from pipeline.tracking import DatasetRecord


def _schema(schema: pa.Schema) -> tuple[tuple[str, str], ...]:
    return tuple((field.name, str(field.type)) for field in schema)


def manifest_record(location: str, table: pa.Table) -> DatasetRecord:
    """A corpus manifest as `pipeline.manifest.read_manifest` returns it."""
    ids = sorted(table.column("id").to_pylist())
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    return DatasetRecord(f"manifest-{Path(str(location)).stem}", digest, redact(str(location)), len(table),
                         _schema(table.schema))


def shards_record(shards: ShardSet, location: str, split: str | None = None, rows: int | None = None) -> DatasetRecord:
    """A tokenization's shards, or the `rows` of them in one `split` of a run. The split is part of the name: MLflow
    keeps one input per (name, digest), and a run's train and val splits share the shards' digest."""
    name = f"shards-{shards.fingerprint}" + (f"-{split}" if split else "")
    return DatasetRecord(name, shards.fingerprint, redact(str(location)), shards.clips if rows is None else rows,
                         _schema(shards.dataset().schema))


def export_record(location: str | Path) -> DatasetRecord:
    """A model export (tokenizer, LLM, super-resolution stage): its kind and weights fingerprint."""
    meta = read_metadata(location)
    return DatasetRecord(f"{meta['kind']}-{meta['fingerprint']}", meta["fingerprint"], redact(str(location)), 0)


def tokenizer_records(shards: ShardSet) -> dict[str, DatasetRecord]:
    """The tokenizers that wrote the shards, per role, as their shard metadata records them."""
    return {role: DatasetRecord(f"{tokenizer['kind']}-{tokenizer['fingerprint']}", tokenizer["fingerprint"],
                                redact(str(tokenizer["location"])), 0)
            for role, tokenizer in shards.meta.tokenizers.items() if tokenizer}
