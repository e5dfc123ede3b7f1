"""`videopoet demo` and `videopoet generate`: their arguments, then their apps (`apps.demo`, `apps.generate`), which
import torch and Ray; this module does not, so `--help` and a bad argument answer at once."""

from __future__ import annotations

import argparse
import os

from pipeline.cli import module_doc
from pipeline.sequence import Task

def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videopoet demo", description=module_doc("apps.demo").split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="run folder, local or an object-store URI (corpus, runs of every stage, summary.json, "
                             "and mlflow.db unless tracking.uri names a server)")
    parser.add_argument("--config", default=None, help="a TOML file of DemoConfig sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set clips=96 or --set llm.train.steps=100")
    parser.add_argument("--quiet", action="store_true", help="no training progress lines (every stage's "
                                                             "train.progress = false)")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    doc = module_doc("apps.generate")
    parser = argparse.ArgumentParser(prog="videopoet generate", description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=doc.split("\n\n", 1)[1])
    tasks = [t.value for t in Task if t != Task.UNCONDITIONAL] + [Task.UNCONDITIONAL.value]
    parser.add_argument("--checkpoint", required=True, help="run folder of `videopoet train llm` (or its model/), "
                                                            "local or an object-store URI, or the export in MLflow: "
                                                            "runs:/<run_id>/model")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                        help="the MLflow tracking URI of runs:/ checkpoints (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--task", required=True, choices=tasks)
    parser.add_argument("--then", action="append", default=[], choices=tasks, help="chain another task on the output")
    parser.add_argument("--prompt", help="the caption (text tasks)")
    parser.add_argument("--image", help="an image file: the first frame (image-to-video)")
    parser.add_argument("--video", help="a video file: its first clip (and its audio) as the condition")
    parser.add_argument("--audio", help="an audio (or video) file whose sound conditions audio-to-video")
    parser.add_argument("--context-frames", type=int, default=1, help="latent frames given (future prediction)")
    parser.add_argument("--extend", type=int, default=0, help="lengthen the video N times by future prediction")
    parser.add_argument("--sr", action="append", default=[], metavar="RUN",
                        help="a run folder of `videopoet train sr` (or its model/): upsample the result; repeat for "
                             "a cascade, lowest resolution first")
    parser.add_argument("--sr-text-encoder", metavar="DIR",
                        help="the text encoder folder of super-resolution stages conditioned on one (an export never "
                             "chooses a program to load)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output MP4")
    return parser


def demo(argv: list[str] | None = None) -> int:
    args = demo_parser().parse_args(argv)
    from apps.demo import run

    return run(args)


def generate(argv: list[str] | None = None) -> int:
    args = generate_parser().parse_args(argv)
    from apps.generate import run

    return run(args)
