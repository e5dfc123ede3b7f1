"""`videopoet train TARGET ...`: each target's arguments, then its app.

The apps import torch, Ray and DeepSpeed; this module imports none of them, so `--help` and a bad argument answer at
once. Each target parses its arguments here, then hands them to its app's `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Mapping

from pipeline.cli import module_doc
from pipeline.config import load_config


def add_run_arguments(parser: argparse.ArgumentParser, flavors: str = "debug, demo, paper") -> None:
    """The options every training app shares: config, overrides, run folder, steps and workers."""
    parser.add_argument("--config", default="demo", help=f"flavor ({flavors}) or a TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-3")
    parser.add_argument("--out", required=True, help="run folder or object-store URI; the same folder resumes")
    parser.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (train.progress = false)")


def app_config(cls: type, args: argparse.Namespace, kind: Mapping[str, str]) -> Any:
    """The app's config from `add_run_arguments` options; raises ConfigError or ValueError naming the problem."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.workers is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.quiet:
        overrides.append("train.progress=false")
    return load_config(cls, args.config, overrides, kind=kind)


def tokenizer_parser(modality: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"videopoet train {modality}-tokenizer",
                                     description=f"Train the {modality} tokenizer on Ray Train.")
    add_run_arguments(parser)
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSONL, CSV, Parquet or HF dataset)")
    if modality == "video":
        parser.add_argument("--init-image", metavar="EXPORT", help="start from this image tokenizer (trained with "
                                                                     "--set mode=image), inflated (init_image)")
    parser.set_defaults(modality=modality)
    return parser


def llm_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videopoet train llm", description=module_doc("train.llm").split("\n\n")[0])
    add_run_arguments(parser, "debug, demo, 300m, 1b, 8b, paper")
    parser.add_argument("--data", required=True, nargs="+", help="token shards: a tokenize job's OUT or its folders")
    parser.add_argument("--init", metavar="EXPORT", help="start from this LLM export (stage-2 adaptation; init)")
    return parser


def superres_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videopoet train sr",
                                     description=module_doc("train.superres").split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--data", required=True, nargs="+", help="token shards written with --hr: a tokenize job's "
                                                                  "OUT or its folders")
    return parser


# target -> (help, its parser, the module whose run(args) trains)
TARGETS: dict[str, tuple[str, Callable[[], argparse.ArgumentParser], str]] = {
    "video-tokenizer": ("train the MAGVIT-v2 video tokenizer", lambda: tokenizer_parser("video"), "train.tokenizers"),
    "audio-tokenizer": ("train the SoundStream audio tokenizer", lambda: tokenizer_parser("audio"), "train.tokenizers"),
    "llm": ("train the VideoPoet LLM with DeepSpeed on token shards", llm_parser, "train.llm"),
    "sr": ("train a super-resolution stage with DeepSpeed on --hr token shards", superres_parser, "train.superres"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: videopoet train TARGET [ARGS...]\n\ntargets:")
        for name, (help_, _, _) in TARGETS.items():
            print(f"  {name:<16} {help_}")
        return 0
    if argv[0] not in TARGETS:
        print(f"videopoet train: unknown target {argv[0]!r} (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    _, parser, module = TARGETS[argv[0]]
    args = parser().parse_args(argv[1:])
    return importlib.import_module(module).run(args)


if __name__ == "__main__":
    raise SystemExit(main())
