"""`videopoet generate`: sample any task from a trained LLM run and write an MP4 (H.264, AAC when there is audio).

    videopoet generate --checkpoint runs/llm --task text_to_video --prompt "a red circle moving left" --out a.mp4
    videopoet generate --checkpoint runs/llm --task image_to_video --image cat.png --then video_to_audio --out b.mp4
    videopoet generate --checkpoint runs/llm --task text_to_video --prompt "..." --extend 3 --out long.mp4
    videopoet generate --checkpoint runs/llm --task text_to_video --prompt "..." --sr runs/sr --out high.mp4
    videopoet generate --checkpoint runs:/RUN_ID/model --tracking-uri http://127.0.0.1:5000 --task text_to_video \
        --prompt "a red circle moving left" --out a.mp4

`--then TASK` chains tasks zero-shot: each step's output clip (frames and audio) is the next step's input.
`--extend N` lengthens the final video N times, each time conditioned on its last second. `--sr RUN` (repeatable,
lowest resolution first) upsamples the result through each super-resolution stage of `videopoet train sr`: the
sampled codes of a single clip directly, an extended video or an image clip by clip from its frames. The sampled
tokens are saved beside the video as `<out>.tokens.npz`. Checkpoints given as `runs:/<run_id>/<path>` are fetched
from MLflow (safetensors and JSON only, as from a folder) into ~/.cache/videopoet/mlflow, those given as
object-store URIs (`s3://bucket/runs/llm`, and the tokenizers an export names that way) into
~/.cache/videopoet/exports, fetched again when the export there changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.generation import Generated, SamplingConfig, VideoPoet, load_frames, model_dir
from pipeline.media import MediaError, decode_audio, write_video
from pipeline.storage import check_folder
from pipeline.tracking import fetch_export

CACHE = Path.home() / ".cache" / "videopoet" / "mlflow"


def sample(args: argparse.Namespace) -> tuple[Generated, VideoPoet]:
    def local(location: str) -> Path:
        return model_dir(fetch_export(location, args.tracking_uri, CACHE))

    poet = VideoPoet.load(local(args.checkpoint), sr=[local(stage) for stage in args.sr],
                          sr_text_encoder=args.sr_text_encoder)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              guidance=args.guidance, seed=args.seed)
    frames = audio = None
    if args.image:
        frames, _ = load_frames(args.image, poet.media, image=True)
    if args.video:
        frames, audio = load_frames(args.video, poet.media, image=False)
    if args.audio:
        seconds = poet.media.clip_samples / poet.media.sample_rate
        audio = decode_audio(args.audio, poet.media.sample_rate, seconds=seconds)
    result = None
    for step, task in enumerate([args.task, *args.then]):
        result = poet.generate(task, prompt=args.prompt, frames=frames, audio=audio, context_frames=args.context_frames,
                               sampling=replace(sampling, seed=sampling.seed + step))
        frames, audio = result.frames, result.audio if result.audio is not None else audio
    if args.extend:
        result.frames = poet.extend(result.frames, args.extend, seconds=1.0, sampling=sampling)
    if poet.stages:
        codes = result.video_codes
        if codes is not None and codes.shape == poet.latent_grid and not args.extend:
            result.hr_video_codes, result.frames = poet.upsample(codes, args.prompt, args.seed)
        else:
            result.frames = poet.upsample_frames(result.frames, args.prompt, args.seed)
    return result, poet


def run(args: argparse.Namespace) -> int:
    """`videopoet generate` with its arguments parsed (`apps.cli`): sample, then write the MP4 and tokens."""
    out = Path(args.out)
    try:
        if out.is_dir():  # checked before sampling, which may take minutes, as is its folder
            raise ValueError(f"--out {out} is a folder; give the MP4 file to write")
        check_folder(str(out.parent), f"--out {out}: folder")
        result, poet = sample(args)
    except (ValueError, MediaError, FileNotFoundError) as e:
        print(f"videopoet generate: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(out), result.frames, poet.media.fps, result.audio, poet.media.sample_rate)
    tokens = out.with_suffix(".tokens.npz")
    codes = (("video_codes", result.video_codes), ("audio_codes", result.audio_codes),
             ("hr_video_codes", result.hr_video_codes))
    np.savez(tokens, ids=result.ids, **{k: v for k, v in codes if v is not None})
    print(json.dumps({"out": str(out), "tokens": str(tokens), "task": result.task.value, "frames": len(result.frames),
                      "size": list(result.frames.shape[1:3]), "audio": result.audio is not None}))
    return 0

