"""`videopoet shards info OUT`: what a tokenize job wrote, per tokenization (fingerprint) folder.

Prints the job's status and input counts, shard and clip counts, its generations (the runs that added inputs to
one corpus), the tokenizers and their fingerprints, token statistics (latent shapes, codebook usage and perplexity
per token column) and the error summary. OUT is a job's output folder (every tokenization in it) or one
`OUT/<fingerprint>` folder; local or any pyarrow filesystem URI. `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import posixpath
import sys
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq

from pipeline.checkpoint import model_classes
from pipeline.config import from_dict
from pipeline.shards import (JOBS_DIR, ERRORS_SCHEMA, ShardError, fingerprint_dirs, is_fingerprint, open_shards,
                             shard_files)
from pipeline.storage import read_json, resolve_filesystem

EXAMPLES = 5  # failed inputs listed by name
TOKEN_ROLES = {"video": "video", "audio": "audio", "hr_video": "video", "structure": "video"}  # column -> tokenizer


def codebook_size(tokenizer: dict[str, Any]) -> int:
    config_class, _ = model_classes(tokenizer["kind"])
    quantizer = from_dict(config_class, tokenizer["config"]).quantizer
    return 2 ** quantizer.bits if tokenizer["kind"] == "magvit" else quantizer.codebook_size


def describe(role: str, tokenizer: dict[str, Any]) -> dict[str, Any]:
    described = {"kind": tokenizer["kind"], "fingerprint": tokenizer["fingerprint"]}
    if role != "text":
        described["codebook_size"] = codebook_size(tokenizer)
    return described


class TokenStats:
    """Code counts of one token column, accumulated file by file so memory stays at one codebook of counts."""

    def __init__(self, size: int):
        self.counts = np.zeros(size, np.int64)
        self.clips = 0
        self.shapes: collections.Counter[tuple[int, ...]] = collections.Counter()

    def add(self, tokens, shapes) -> None:
        present = pc.is_valid(tokens)
        tokens, shapes = tokens.filter(present), shapes.filter(present)
        self.clips += len(tokens)
        self.shapes.update(tuple(s) for s in shapes.to_pylist())
        codes = pc.list_flatten(tokens).to_numpy()
        if codes.size and (codes.min() < 0 or codes.max() >= len(self.counts)):
            raise ShardError(f"token codes span [{codes.min()}, {codes.max()}], outside the codebook of "
                             f"{len(self.counts)}")
        self.counts += np.bincount(codes.astype(np.int64), minlength=len(self.counts))

    def summary(self) -> dict[str, Any]:
        used = self.counts > 0
        p = self.counts[used] / max(1, self.counts.sum())
        return {"clips": self.clips, "shapes": {"x".join(map(str, s)): n for s, n in sorted(self.shapes.items())},
                "tokens": int(self.counts.sum()), "codebook_size": len(self.counts), "codes_used": int(used.sum()),
                "used_fraction": round(float(used.mean()), 4),
                "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2) if p.size else 0.0}


def tokenization_info(location: str, fs: pa_fs.FileSystem, root: str, fingerprint: str) -> dict[str, Any]:
    """Everything `info` reports about OUT/<fingerprint> (`root` is OUT inside `fs`)."""
    shard_dir = posixpath.join(root, fingerprint)
    job_dir = posixpath.join(root, JOBS_DIR, fingerprint)
    job = read_json(fs, posixpath.join(job_dir, "job.json")) or {}
    info: dict[str, Any] = {"fingerprint": fingerprint, "folder": f"{location.rstrip('/')}/{fingerprint}",
                            "status": job.get("status", "unknown")}
    info.update({k: job[k] for k in ("inputs", "inputs_ok", "inputs_failed", "inputs_partial", "error_fraction",
                                     "shards", "updated") if k in job})
    if "generations" in job:  # one corpus, grown by appends: each run's new inputs sorted into shards after the others
        info["generations"] = [{k: g[k] for k in ("index", "inputs", "first_shard", "shards", "created")}
                               for g in job["generations"]]
    files = shard_files(fs, shard_dir)
    tokenizers = job.get("tokenizers")
    if files:
        shards = open_shards([f"{location.rstrip('/')}/{fingerprint}"])
        tokenizers = shards.meta.tokenizers
        info.update(schema_version=shards.meta.schema_version, files=len(files), clips=shards.clips)
        info["tokens"] = token_stats(fs, files, tokenizers)
    if tokenizers:
        info["tokenizers"] = {role: describe(role, t) for role, t in tokenizers.items() if t}
    errors_path = posixpath.join(job_dir, "errors.parquet")
    if fs.get_file_info(errors_path).type == pa_fs.FileType.File:
        kinds: collections.Counter[str] = collections.Counter()
        stages: collections.Counter[str] = collections.Counter()
        examples: list[dict[str, Any]] = []
        with fs.open_input_file(errors_path) as f:  # batch by batch: a corpus of millions may fail by millions
            for batch in pq.ParquetFile(f).iter_batches(columns=list(ERRORS_SCHEMA.names)):
                kinds.update(batch.column("error_kind").to_pylist())
                stages.update(batch.column("stage").to_pylist())
                examples += batch.slice(0, EXAMPLES - len(examples)).select(
                    ["source", "stage", "error_kind", "message"]).to_pylist()
        info["errors"] = {"count": kinds.total(), "by_kind": dict(sorted(kinds.items())),
                          "by_stage": dict(sorted(stages.items())), "examples": examples}
    return info


def token_stats(fs: pa_fs.FileSystem, files: list[str], tokenizers: dict[str, Any]) -> dict[str, Any]:
    stats = {name: TokenStats(codebook_size(tokenizers[role])) for name, role in TOKEN_ROLES.items()
             if tokenizers.get(role)}
    text_shapes: collections.Counter[tuple[int, ...]] = collections.Counter()
    for path in files:
        columns = [c for name in stats for c in (f"{name}_tokens", f"{name}_shape")] + ["text_shape"]
        table = pq.read_table(path, filesystem=fs, columns=columns)
        for name, s in stats.items():
            s.add(table.column(f"{name}_tokens").combine_chunks(), table.column(f"{name}_shape").combine_chunks())
        text_shapes.update(tuple(shape) for shape in table.column("text_shape").to_pylist() if shape)
    report: dict[str, Any] = {name: s.summary() for name, s in stats.items() if s.clips}
    if text_shapes:
        report["text"] = {"clips": sum(text_shapes.values()), "width": next(iter(text_shapes))[1],
                          "mean_positions": round(sum(s[0] * n for s, n in text_shapes.items())
                                                  / sum(text_shapes.values()), 2)}
    return report


def info(location: str) -> list[dict[str, Any]]:
    """One report per tokenization under `location` (a job's OUT, or one OUT/<fingerprint> folder)."""
    fs, path = resolve_filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pa_fs.FileType.NotFound:
        raise ShardError(f"shards info: {location} does not exist")
    if kind == pa_fs.FileType.File:
        raise ShardError(f"shards info: {location} is a file; give a tokenize job's OUT folder or OUT/<fingerprint>")
    name = posixpath.basename(path.rstrip("/"))
    if is_fingerprint(name):
        return [tokenization_info(location.rstrip("/")[: -len(name) - 1], fs, posixpath.dirname(path), name)]
    found = sorted(set(fingerprint_dirs(fs, path)) | set(fingerprint_dirs(fs, posixpath.join(path, JOBS_DIR))))
    if not found:
        raise ShardError(f"shards info: no tokenization folders (OUT/<fingerprint>) under {location}")
    return [tokenization_info(location, fs, path, fp) for fp in found]


def format_info(report: dict[str, Any]) -> str:
    lines = [f"{report['folder']}  status {report['status']}, schema v{report.get('schema_version', '?')}"]
    tokenizers = report.get("tokenizers") or {}
    for role in ("video", "audio", "text"):
        if t := tokenizers.get(role):
            codebook = f", codebook {t['codebook_size']}" if "codebook_size" in t else ""
            lines.append(f"  {role} {'encoder' if role == 'text' else 'tokenizer'}: {t['kind']}, "
                         f"fingerprint {t['fingerprint']}{codebook}")
    if "inputs" in report:
        lines.append(f"  inputs: {report['inputs']} ({report['inputs_ok']} ok, {report['inputs_failed']} failed, "
                     f"{report['inputs_partial']} of them kept clips; error fraction {report['error_fraction']:.1%})")
    lines.append(f"  shards: {report.get('shards', '?')} ({report.get('files', 0)} files with clips), "
                 f"clips: {report.get('clips', 0)}")
    if generations := report.get("generations"):
        parts = ", ".join(f"{g['inputs']} inputs in shards {g['first_shard']}-{g['first_shard'] + g['shards'] - 1} "
                          f"({g['created']})" for g in generations)
        lines.append(f"  generations: {len(generations)}: {parts}")
    tokens = dict(report.get("tokens", {}))
    text = tokens.pop("text", None)
    for name, s in tokens.items():
        shapes = ", ".join(f"{shape} x{n}" for shape, n in s["shapes"].items())
        lines.append(f"  {name} tokens: {s['clips']} clips ({shapes}), {s['tokens']} tokens, codes used "
                     f"{s['codes_used']}/{s['codebook_size']} ({s['used_fraction']:.1%}), perplexity "
                     f"{s['perplexity']:.1f}")
    if text:
        lines.append(f"  text embeddings: {text['clips']} clips, width {text['width']}, "
                     f"{text['mean_positions']:.1f} positions on average")
    errors = report.get("errors")
    if errors:
        kinds = ", ".join(f"{k} {n}" for k, n in errors["by_kind"].items()) or "none"
        lines.append(f"  errors: {errors['count']} ({kinds})")
        lines += [f"    {e['source']}: {e['stage']} {e['error_kind']}: {e['message']}" for e in errors["examples"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`videopoet shards` with its arguments parsed (`tokenize_jobs.cli`)."""
    try:
        reports = info(args.out)
    except ShardError as e:
        print(f"videopoet shards: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"tokenizations": reports}, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_info(r) for r in reports))
    return 0

