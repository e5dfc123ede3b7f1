"""`videopoet eval`: its arguments, then the stage (`eval.stage`), which imports torch and Ray; this module does not,
so `--help` and a bad argument answer at once."""

from __future__ import annotations

import argparse

from pipeline.cli import module_doc


def eval_parser() -> argparse.ArgumentParser:
    doc = module_doc("eval.stage")
    parser = argparse.ArgumentParser(prog="videopoet eval", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="run folder of `videopoet train llm` (or its model/)")
    parser.add_argument("--prompts", required=True,
                        help="a JSONL or text prompts file, or a built-in set (below)")
    parser.add_argument("--real", help="a corpus manifest: the real clips FVD compares against")
    parser.add_argument("--out", required=True, help="output folder or object-store URI (samples.parquet, "
                                                     "metrics.json, plots, ...)")
    parser.add_argument("--config", default="demo", help="flavor (debug, demo, paper) or a TOML file")
    parser.add_argument("--samples", type=int, help="evaluate only the first N samples (max_samples)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set i3d.weights=rgb_imagenet.pt")
    parser.add_argument("--parent-run", help="MLflow run id (the training run) to nest this run under")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: OUT/mlflow.db, or with --parent-run "
                                               "the store the checkpoint's mlflow_run.json records)")
    parser.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    from eval.stage import run

    return run(args)
