"""The tokenizer recipe's adversarial terms, measured: the demo video tokenizer trained with and without its GAN
discriminator for the same wall-clock budget, then compared on clips it held out and clips it never saw.

1. Throughput: one worker's training step of the demo tokenizer with and without the discriminator (the generator's
   adversarial term, its adaptive weight and the discriminator's own step), timed in this process on the same batches,
   rounds interleaved. `ratio` = adversarial step / plain step.
2. Same budget: `videopoet train video-tokenizer --config demo` (the product's app: Ray Train + DeepSpeed, one worker)
   for `--steps` plain steps, and for `steps / ratio` steps with the discriminator on (from `--start` of its steps on).
3. Quality of both exports on the demo corpus's held-out clips and on never-seen clips of the synthetic world (another
   seed): PSNR, SSIM, edge sharpness (mean spatial gradient magnitude of the reconstruction over the original's,
   `pipeline.metrics.sharpness`), and the world's oracle reading shape, color and motion from the reconstructions.
4. With `--real`, the same on the real clips of ../shared/corpus/real: trained on some files, evaluated on the others
   (frame size of the demo flavor; the budget is far too small for real video, and the figures say so).

    python benchmarks/tokenizer_recipe.py [--steps 1200] [--start 0.5] [--real] [--out DIR]
The last line is one JSON object with every figure; `ratio` is the discriminator's throughput cost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.adversarial import VideoDiscriminator
from pipeline.checkpoint import load_checkpoint
from pipeline.config import load_config
from pipeline.magvit import MagvitModel, tensor_to_video, video_to_tensor
from pipeline.manifest import read_manifest
from pipeline.media import decode
from pipeline.metrics import psnr, sharpness, ssim
from pipeline.oracle import ATTRIBUTES, read_video_attributes, score
from pipeline.synth import SynthConfig, write_corpus
from train.tokenizers import GeneratorObjective, VideoModality, VideoTokenizerTrainConfig, train_tokenizer

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
REAL_TRAIN = ("chaplin.mp4", "fire2.mp4", "flipping_a_pancake.mkv", "smpte-2997.mp4", "video_90.mov")
REAL_EVAL = ("example.mp4", "result.webm", "transparent.webm", "no_duration.webm")


def demo_app(adversarial: bool, steps: int, start: float, *overrides: str) -> VideoTokenizerTrainConfig:
    settings = [f"train.steps={steps}", "train.progress=false", "tracking.enabled=false", *overrides]
    if adversarial:
        settings += ["discriminator.enabled=true", "discriminator.channels=16", "discriminator.channel_mults=[1, 2]",
                     "discriminator.adaptive_weight=true", f"discriminator.start_step={int(start * steps)}"]
    return load_config(VideoTokenizerTrainConfig, "demo", settings, kind=VideoModality.kinds)


def step_times(app: VideoTokenizerTrainConfig, clips: np.ndarray, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per training step, plain and adversarial, interleaved rounds on the same batches."""
    times: dict[str, list[float]] = {"plain": [], "adversarial": []}
    for round_ in range(rounds):
        for variant in ("plain", "adversarial") if round_ % 2 == 0 else ("adversarial", "plain"):
            torch.manual_seed(0)
            model = MagvitModel(app.model)
            critic = VideoDiscriminator(app.discriminator) if variant == "adversarial" else None
            objective = GeneratorObjective(model, VideoModality, app, critic, None)
            optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4)]
            if critic is not None:
                optimizers.append(torch.optim.AdamW(critic.parameters(), lr=1e-4))
            rng = np.random.default_rng(0)
            for step in range(steps + 1):
                x = VideoModality.batch(clips, rng.integers(len(clips), size=app.train.batch_size), app, rng)
                began = time.perf_counter()
                if critic is not None:
                    critic.requires_grad_(False)
                loss, _, reconstruction = objective(x, adversarial=critic is not None)
                loss.backward()
                optimizers[0].step()
                optimizers[0].zero_grad()
                if critic is not None:
                    critic.requires_grad_(True)
                    critic_loss, _ = critic.discriminator_loss(x, reconstruction)
                    critic_loss.backward()
                    optimizers[1].step()
                    optimizers[1].zero_grad()
                if step:  # the first step allocates
                    times[variant].append(time.perf_counter() - began)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def quality(tokenizer: MagvitModel, clips: np.ndarray, truth: list[dict] | None) -> dict[str, float]:
    recon = np.concatenate([tensor_to_video(tokenizer.decode(tokenizer.encode(video_to_tensor(clips[i:i + 8]))))
                            .numpy() for i in range(0, len(clips), 8)])
    figures = {"clips": len(clips), "psnr": psnr(clips, recon), "ssim": ssim(clips, recon),
               "sharpness": sharpness(clips, recon)}
    if truth is not None:
        scores = score([read_video_attributes(r) for r in recon], truth)
        figures.update({f"oracle_{a}": scores[a] for a in (*ATTRIBUTES, "all")})
    return figures


def clips_of(rows: list[dict], root: Path, media) -> tuple[np.ndarray, list[dict]]:
    frames, truth = [], []
    for row in rows:
        for clip in decode(str(root / row["path"]), media).clips:
            frames.append(clip.frames)
            truth.append({a: row.get(a) for a in ATTRIBUTES})
    return np.stack(frames), truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="plain steps (the demo flavor's 1,200)")
    parser.add_argument("--start", type=float, default=0.5, help="share of the steps before the discriminator joins")
    parser.add_argument("--probe-steps", type=int, default=6, help="timed steps per round for the throughput ratio")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--real", action="store_true", help="also train and evaluate on ../shared/corpus/real")
    parser.add_argument("--real-steps", type=int, default=400)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        synth = SynthConfig()
        write_corpus(out / "corpus", synth, 192, seed=0)
        write_corpus(out / "unseen", synth, 96, seed=1)
        manifest = out / "corpus" / "manifest.jsonl"
        plain_app = demo_app(False, args.steps, args.start)
        media = replace(plain_app.media, audio=False)
        rows = read_manifest(str(manifest)).to_pylist()
        train_clips, _ = clips_of([r for r in rows if r["split"] != "val"][:32], out / "corpus", media)

        probe = step_times(demo_app(True, args.steps, 0.0), train_clips, args.probe_steps, args.rounds)
        ratio = probe["adversarial"] / probe["plain"]
        adversarial_steps = int(args.steps / ratio)
        print(f"step: plain {probe['plain'] * 1000:.0f} ms, with the discriminator {probe['adversarial'] * 1000:.0f} "
              f"ms (x{ratio:.2f}): {args.steps} vs {adversarial_steps} steps for the same budget", flush=True)

        held_out, held_truth = clips_of([r for r in rows if r["split"] == "val"], out / "corpus", media)
        unseen, unseen_truth = clips_of(read_manifest(str(out / "unseen" / "manifest.jsonl")).to_pylist(),
                                        out / "unseen", media)
        variants = {"plain": plain_app, "adversarial": demo_app(True, adversarial_steps, args.start)}
        results: dict[str, dict] = {}
        for name, app in variants.items():
            summary = train_tokenizer("video", app, str(manifest), out / name)
            tokenizer = load_checkpoint(out / name / "tokenizer").eval()
            results[name] = {"steps": summary["steps"], "seconds": round(summary["seconds"], 1),
                             "held_out": quality(tokenizer, held_out, held_truth),
                             "unseen": quality(tokenizer, unseen, unseen_truth)}
            print(name, json.dumps(results[name]), flush=True)

        real = {}
        if args.real:
            real_manifest = out / "real.jsonl"
            real_manifest.write_text("".join(json.dumps({"path": str(REAL / f), "split": "train"}) + "\n"
                                             for f in REAL_TRAIN))
            eval_clips, _ = clips_of([{"path": f} for f in REAL_EVAL], REAL, replace(media, max_clips=4))
            for name, adversarial in (("plain", False), ("adversarial", True)):
                steps = args.real_steps if not adversarial else int(args.real_steps / ratio)
                app = demo_app(adversarial, steps, args.start, "val_clips=4")
                train_tokenizer("video", app, str(real_manifest), out / f"real_{name}")
                tokenizer = load_checkpoint(out / f"real_{name}" / "tokenizer").eval()
                real[name] = {"steps": steps, **quality(tokenizer, eval_clips, None)}
                print(f"real {name}", json.dumps(real[name]), flush=True)

    print(json.dumps({
        "benchmark": "tokenizer_recipe", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "flavor": "demo",
        "step_ms": {k: round(v * 1000, 1) for k, v in probe.items()}, "ratio": round(ratio, 3),
        "start_share": args.start, "results": results, "real": real,
        "seconds": round(time.perf_counter() - began, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
