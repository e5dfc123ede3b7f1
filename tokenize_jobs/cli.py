"""`videopoet tokenize` and `videopoet shards`: their arguments, then their apps (`tokenize_jobs.job`,
`tokenize_jobs.shards_cli`), which import torch and Ray; this module does not, so `--help` answers at once."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import module_doc

def tokenize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videopoet tokenize",
                                     description=module_doc("tokenize_jobs.job").split("\n\n")[0],
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
    parser.add_argument("--track", action="store_true", help="log the summary to MLflow in OUT/__jobs/mlflow.db")
    parser.add_argument("--parent-run-id", help="log as a child run of this MLflow run")
    return parser


def shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videopoet shards", description="Inspect token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="counts, token statistics, fingerprints and errors",
                               description=module_doc("tokenize_jobs.shards_cli").split("\n\n")[1])
    info.add_argument("out", help="a tokenize job's OUT folder, or OUT/<fingerprint>")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def tokenize(argv: list[str] | None = None) -> int:
    args = tokenize_parser().parse_args(argv)
    from tokenize_jobs.job import run

    return run(args)


def shards(argv: list[str] | None = None) -> int:
    args = shards_parser().parse_args(argv)
    from tokenize_jobs.shards_cli import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(tokenize(sys.argv[1:]))
