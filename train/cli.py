"""`videopoet train TARGET ...`: forwards to the training app of each target."""

from __future__ import annotations

import sys
from functools import partial

from train import llm, superres, tokenizers

TARGETS = {
    "video-tokenizer": ("train the MAGVIT-v2 video tokenizer", partial(tokenizers.main, modality_name="video")),
    "audio-tokenizer": ("train the SoundStream audio tokenizer", partial(tokenizers.main, modality_name="audio")),
    "llm": ("train the VideoPoet LLM with DeepSpeed on token shards", llm.main),
    "sr": ("train a super-resolution stage with DeepSpeed on --hr token shards", superres.main),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: videopoet train TARGET [ARGS...]\n\ntargets:")
        for name, (help_, _) in TARGETS.items():
            print(f"  {name:<16} {help_}")
        return 0
    if argv[0] not in TARGETS:
        print(f"videopoet train: unknown target {argv[0]!r} (targets: {', '.join(TARGETS)})", file=sys.stderr)
        return 2
    return TARGETS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
