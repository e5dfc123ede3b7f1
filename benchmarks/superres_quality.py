"""Super-resolution quality on held-out clips: the stage's token accuracy and the PSNR of its decoded output against
the ground-truth high-resolution frames, next to bicubic upsampling of the low-resolution decode.

For each `val` clip of the `--hr` shards a stage was trained on, the ground truth is the clip decoded at twice the
shards' frame size (as the tokenize job decoded it); the low-res frames are its 2x2 means, and the low- and high-res
codes are the shards'. PSNR (dB over all pixels of a clip, mean over clips) against the ground truth, of:

    sr            the stage's codes (parallel decoding from the low-res codes with the caption as text, the stage's
                  decoding config) decoded by the video tokenizer
    bicubic       the low-res codes decoded, then upsampled 2x (bicubic)
    tokenizer_hr  the true high-res codes decoded: what a perfect token-space stage would reach with this tokenizer
    bicubic_lr    the ground-truth low-res frames upsampled 2x (bicubic), no tokenizer at all

Token accuracy: the share of high-res positions whose code (all k sub-tokens) the stage gets right, next to `copy`,
each low-res code repeated over the 2x2 positions it covers (right wherever a patch looks the same at both scales,
as on a flat background). Prints a table and, last, one JSON object.

    python -m benchmarks.superres_quality --sr RUN --data SHARDS --manifest M [--clips 16] [--set temperature=0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from pipeline.config import apply_overrides, from_dict, to_dict
from pipeline.generation import SuperResStage, model_dir
from pipeline.manifest import read_manifest
from pipeline.masking import DecodingConfig
from pipeline.media import MediaConfig, decode
from pipeline.metrics import psnr
from pipeline.shards import open_shards

COLUMNS = ["id", "clip_index", "caption", "split", "video_tokens", "video_shape", "hr_video_tokens", "hr_video_shape"]


def bicubic_2x(frames: np.ndarray) -> np.ndarray:
    x = rearrange(torch.from_numpy(frames).float(), "t h w c -> t c h w")
    up = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 255).round()
    return rearrange(up, "t c h w -> t h w c").to(torch.uint8).numpy()


def ground_truth(path: str, clip_index: int, media: MediaConfig) -> np.ndarray:
    result = decode(path, replace(media, max_clips=clip_index + 1))
    if len(result.clips) <= clip_index:
        raise RuntimeError(f"{path}: clip {clip_index} could not be decoded again ({result.error})")
    return result.clips[clip_index].frames


def measure(stage: SuperResStage, rows: list[dict], paths: dict[str, str], hr_media: MediaConfig,
            seed: int = 0) -> dict[str, float]:
    """Mean PSNRs and token accuracies (the module's docstring) over shard `rows` (COLUMNS) whose inputs are at
    `paths[id]`, with the ground truth decoded at `hr_media`."""
    scores: dict[str, list[float]] = {k: [] for k in ("sr", "bicubic", "tokenizer_hr", "bicubic_lr",
                                                      "accuracy", "copy_accuracy")}
    for i, row in enumerate(rows):
        truth = ground_truth(paths[row["id"]], row["clip_index"], hr_media)
        low = np.round(reduce(truth.astype(np.float32), "t (h a) (w b) c -> t h w c", "mean", a=2, b=2))
        lr = np.asarray(row["video_tokens"], np.int64).reshape(row["video_shape"])
        hr = np.asarray(row["hr_video_tokens"], np.int64).reshape(row["hr_video_shape"])
        sampled = stage.upsample(lr, row["caption"], seed=seed + i)
        scores["sr"].append(psnr(truth, stage.decode_video(sampled)))
        scores["bicubic"].append(psnr(truth, bicubic_2x(stage.decode_video(lr))))
        scores["tokenizer_hr"].append(psnr(truth, stage.decode_video(hr)))
        scores["bicubic_lr"].append(psnr(truth, bicubic_2x(low.astype(np.uint8))))
        scores["accuracy"].append(float((sampled == hr).mean()))
        scores["copy_accuracy"].append(float((repeat(lr, "t h w -> t (h a) (w b)", a=2, b=2) == hr).mean()))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr", required=True, help="run folder of `videopoet train sr` (or its model/)")
    parser.add_argument("--data", required=True, help="the --hr token shards the stage was trained on")
    parser.add_argument("--manifest", required=True, help="the corpus manifest the shards were tokenized from")
    parser.add_argument("--clips", type=int, default=16, help="held-out clips to score (at most)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="decoding", action="append", default=[], metavar="KEY=VALUE",
                        help="override the stage's decoding config, e.g. --set temperature=0 --set text_guidance=1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    stage = SuperResStage.load(model_dir(args.sr))
    stage.decoding = from_dict(DecodingConfig, apply_overrides(to_dict(stage.decoding), args.decoding))
    shards = open_shards(args.data)
    media = from_dict(MediaConfig, shards.meta.settings["media"])
    hr_media = replace(media, height=2 * media.height, width=2 * media.width, audio=False)
    rows = [r for r in shards.to_table(COLUMNS).to_pylist() if r["split"] == "val"][: args.clips]
    if not rows:
        raise SystemExit(f"{args.data}: no clips in the val split")
    paths = dict(zip(*(read_manifest(args.manifest).column(c).to_pylist() for c in ("id", "path"))))

    began = time.perf_counter()
    means = measure(stage, rows, paths, hr_media, args.seed)
    seconds = time.perf_counter() - began

    print(f"{len(rows)} held-out clips, {media.clip_frames} frames {media.height}x{media.width} -> "
          f"{hr_media.height}x{hr_media.width}, codes {stage.lr_grid} -> {stage.grid}, "
          f"decoding {to_dict(stage.decoding)}, {seconds:.1f} s")
    print("| PSNR dB: sr | bicubic of lr decode | hr tokenizer ceiling | bicubic of true lr | token accuracy | copy |")
    print(f"| {means['sr']:.2f} | {means['bicubic']:.2f} | {means['tokenizer_hr']:.2f} | {means['bicubic_lr']:.2f} "
          f"| {means['accuracy']:.3f} | {means['copy_accuracy']:.3f} |")
    print(json.dumps({"date": datetime.date.today().isoformat(), "machine": platform.machine(), "clips": len(rows),
                      "seconds": round(seconds, 1), "decoding": to_dict(stage.decoding),
                      **{k: round(v, 4) for k, v in means.items()}}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
