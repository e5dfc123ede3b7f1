"""Generation speed: KV-cached against uncached sampling of one 1,280-token video.

The paper's text-to-video layout: a 17x128x128 clip is a (5, 16, 16) latent, 1,280 video tokens, sampled with
`<eov_o>` and `<eos>` (1,282 tokens) after a prompt of 8 words (64 text-embedding positions when the flavor has no
word range). The model has random weights (speed does not depend on them) and samples greedily, so both paths must
give the same tokens (`identical`). Cached: `pipeline.sampling.generate`, one bidirectional prefill and one cached
forward per token, best of `--rounds`. Uncached: `generate_uncached`, the whole sequence recomputed per token, run
once (it is the slow one). `ratio` = uncached time / cached time = the cached tokens/s over the uncached tokens/s.
With `--batch B` > 1 the B prompts are also sampled one per call (cached, seeds as a batch gives its rows), and
`batched_ratio` = that time / the batched time, with `batched_identical` saying whether both gave the same tokens.

On the CPU torch runs on `--threads` threads, 1 unless set: on a shared, oversubscribed CPU the OpenMP barriers of
multi-threaded kernels wait on descheduled threads, and small decode steps get 10-100x slower at random. `--latent`
sets another latent grid (a smaller one runs the same code in less time).

    python benchmarks/generate.py [--flavor demo] [--device cpu] [--dtype float32] [--batch 1] [--rounds 3]
    python benchmarks/generate.py --flavor 300m --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sampling import generate, generate_uncached
from pipeline.sequence import Layout, Task, build_prompt

LATENT = (5, 16, 16)  # 17 frames of 128x128 through MAGVIT-v2
WORDS = 8


def text_to_video(cfg: LLMConfig, batch: int, device: torch.device, latent: tuple[int, int, int] = LATENT
                  ) -> tuple[Layout, np.ndarray, torch.Tensor | None]:
    """The layout, a prompt batch (B, P) and the text embeddings it needs (None with word tokens)."""
    if cfg.vocab.text_size:
        layout = Layout(Task.TEXT_TO_VIDEO, cfg.vocab, latent, text_tokens=WORDS)
        prompt = build_prompt(layout, text=np.arange(WORDS) % cfg.vocab.text_size)
        return layout, np.stack([prompt] * batch), None
    layout = Layout(Task.TEXT_TO_VIDEO, cfg.vocab, latent, text_embeddings=64)
    embeddings = torch.randn(batch, 64, cfg.text_width, generator=torch.Generator().manual_seed(0))
    return layout, np.stack([build_prompt(layout)] * batch), embeddings.to(device)


def timed(fn, device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="demo", help="LLM flavor or config TOML (default: demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="cached runs; the best counts")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "1")),
                        help="CPU threads for torch (default 1, or $TORCH_THREADS)")
    parser.add_argument("--latent", type=int, nargs=3, default=LATENT, metavar=("T", "H", "W"),
                        help="the video's latent grid (default: 5 16 16, 1,280 tokens)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    if min(args.latent) < 1 or args.batch < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--latent sizes, --batch, --rounds and --threads must be >= 1")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(LLMConfig, args.flavor, args.set, kind="llm")
    torch.manual_seed(0)
    model = VideoPoetLM(cfg).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    layout, prompts, embeddings = text_to_video(cfg, args.batch, device, tuple(args.latent))
    tokens = layout.length - layout.prefix_length

    def run(sampler):
        return sampler(model, layout, prompts, text_embeddings=embeddings, temperature=0)

    run(generate)  # warm-up
    cached_s, cached = min((timed(lambda: run(generate), device) for _ in range(args.rounds)), key=lambda r: r[0])
    uncached_s, uncached = timed(lambda: run(generate_uncached), device)
    batched = {}
    if args.batch > 1:
        def one_at_a_time():
            return np.concatenate([generate(model, layout, prompts[i], temperature=0, seed=i, text_embeddings=None
                                            if embeddings is None else embeddings[i]) for i in range(args.batch)])
        alone_s, alone = timed(one_at_a_time, device)
        batched = {"one_at_a_time_s": round(alone_s, 3), "batched_ratio": round(alone_s / cached_s, 2),
                   "batched_identical": bool((alone == cached).all())}
    result = {
        "benchmark": "generate", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "flavor": args.flavor, "overrides": args.set, "dtype": args.dtype,
        "params": model.num_params(), "batch": args.batch, "latent": list(args.latent),
        "prompt_tokens": layout.prefix_length,
        "sampled_tokens": tokens, "cached_s": round(cached_s, 3), "uncached_s": round(uncached_s, 3),
        "cached_tokens_per_s": round(args.batch * tokens / cached_s, 1),
        "uncached_tokens_per_s": round(args.batch * tokens / uncached_s, 2),
        "identical": bool((cached == uncached).all()), **batched, "ratio": round(uncached_s / cached_s, 2),
    }
    print(f"{args.flavor} ({result['params'] / 1e6:.1f}M parameters, {result['device']}, {args.dtype}, "
          f"{args.threads} threads): {tokens} tokens x {args.batch} after a {layout.prefix_length}-token prompt; "
          f"cached {cached_s:.2f} s ({result['cached_tokens_per_s']} tokens/s), uncached {uncached_s:.1f} s "
          f"({result['uncached_tokens_per_s']} tokens/s): {result['ratio']}x, identical tokens: {result['identical']}")
    if batched:
        print(f"the {args.batch} prompts one per call: {batched['one_at_a_time_s']:.2f} s, {batched['batched_ratio']}x "
              f"the batch's time, identical tokens: {batched['batched_identical']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
