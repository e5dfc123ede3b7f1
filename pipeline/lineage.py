"""What MLflow records of the data a run read or produced (`pipeline.tracking.DatasetRecord`), for each kind of data
the pipeline passes along: corpus manifests, token shards, model exports and prompt sets.

Digests identify content, so a researcher can follow one through runs: a manifest by the hash of its sorted ids, a
tokenization's shards by their fingerprint (which hashes the tokenizers' fingerprints and the decode settings), an
export by its weights fingerprint, a prompt set by the hash of its prompts. The chain reads: manifest (digest) ->
tokenize run (`source` input, `output` shards) -> training run (`train`/`val` shards) -> export (fingerprint tag) ->
eval run (`model` input). Locations are recorded with credentials redacted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa

from pipeline.checkpoint import read_metadata
from pipeline.shards import SCHEMA, ShardSet
from pipeline.storage import redact
from pipeline.tracking import DatasetRecord


def _schema(schema: pa.Schema) -> tuple[tuple[str, str], ...]:
    return tuple((field.name, str(field.type)) for field in schema)


def manifest_record(location: str, table: pa.Table) -> DatasetRecord:
    """A corpus manifest as `pipeline.manifest.read_manifest` returns it."""
    ids = sorted(table.column("id").to_pylist())
    return corpus_record(location, [hashlib.sha256("\n".join(ids).encode()).hexdigest()], len(table), table.schema)


def corpus_record(location: str, id_hashes: Sequence[str], rows: int, schema: pa.Schema) -> DatasetRecord:
    """A corpus from the sha256 of each of its generations' sorted ids, joined by newlines (a tokenize job's corpus
    grows by generations): a corpus of one generation has its manifest's digest (`manifest_record`)."""
    digest = id_hashes[0] if len(id_hashes) == 1 else hashlib.sha256("\n".join(id_hashes).encode()).hexdigest()
    return DatasetRecord(f"manifest-{Path(str(location)).stem}", digest[:16], redact(str(location)), rows,
                         _schema(schema))


def shards_record(shards: ShardSet, location: str, split: str | None = None, rows: int | None = None) -> DatasetRecord:
    """A tokenization's shards, or the `rows` of them in one `split` of a run. The split is part of the name: MLflow
    keeps one input per (name, digest), and a run's train and val splits share the shards' digest."""
    return tokenization_record(shards.fingerprint, location, shards.clips if rows is None else rows, split)


def tokenization_record(fingerprint: str, location: str, clips: int, split: str | None = None) -> DatasetRecord:
    """The shards of the tokenization `fingerprint` (a tokenize job's output, before anyone opens them)."""
    return DatasetRecord(f"shards-{fingerprint}" + (f"-{split}" if split else ""), fingerprint, redact(str(location)),
                         clips, _schema(SCHEMA))


def export_record(location: str | Path) -> DatasetRecord:
    """A model export (tokenizer, LLM, super-resolution stage): its kind and weights fingerprint."""
    meta = read_metadata(location)
    return DatasetRecord(f"{meta['kind']}-{meta['fingerprint']}", meta["fingerprint"], redact(str(location)), 0)


def tokenizer_records(tokenizers: Mapping[str, Optional[Mapping[str, Any]]]) -> dict[str, DatasetRecord]:
    """Tokenizers per role, as shard metadata and tokenize jobs record them (kind, fingerprint, location)."""
    return {role: DatasetRecord(f"{tokenizer['kind']}-{tokenizer['fingerprint']}", tokenizer["fingerprint"],
                                redact(str(tokenizer["location"])), 0)
            for role, tokenizer in tokenizers.items() if tokenizer}


def prompts_record(name: str, prompts: Sequence[Any]) -> DatasetRecord:
    """An eval prompt set (`eval.prompts.PromptSet`'s name and prompts, dataclasses or mappings)."""
    text = json.dumps([p if isinstance(p, Mapping) else vars(p) for p in prompts], sort_keys=True)
    return DatasetRecord(f"prompts-{Path(name).stem}", hashlib.sha256(text.encode()).hexdigest()[:16], name,
                         len(prompts), (("task", "string"), ("text", "string"), ("attributes", "map"),
                                        ("video", "string")))
