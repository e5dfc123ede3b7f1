"""The `videopoet` command: one entry point that forwards to each app's `main(argv)`.

Apps are imported lazily so `videopoet --help` stays fast and a subcommand pays only for its own imports.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

# subcommand -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("apps.cli:demo", "run the end-to-end demo on embedded defaults"),
    "synth": ("pipeline.synth:main", "write a synthetic audio-visual corpus (MP4 files + manifest)"),
    "probe": ("pipeline.probe:main", "print stream information of media files as JSON, one object per file"),
    "tokenize": ("tokenize_jobs.cli:tokenize", "tokenize a corpus into Parquet token shards with Ray Data"),
    "shards": ("tokenize_jobs.cli:shards", "inspect token shards: `videopoet shards info OUT`"),
    "train": ("train.cli:main", "train a tokenizer, the LLM or the super-resolution stage on Ray Train"),
    "generate": ("apps.cli:generate", "sample a task from a trained LLM and write an MP4 (with audio)"),
    "eval": ("eval.cli:main", "evaluate a trained LLM on Ray: FVD, CLIPSIM, fairness, prompt adherence -> MLflow"),
}


def module_doc(name: str) -> str:
    """A module's docstring, read without importing the module: an app's imports (torch, Ray) are what `--help` and
    a bad argument must not wait for."""
    return ast.get_docstring(ast.parse(Path(importlib.util.find_spec(name).origin).read_text())) or ""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: videopoet COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `videopoet COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"videopoet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
