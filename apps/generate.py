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
from MLflow (safetensors and JSON only, as from a folder) into ~/.cache/videopoet/mlflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.generation import Generated, SamplingConfig, VideoPoet, load_frames, model_dir
from pipeline.media import MediaError, decode_audio, write_video
from pipeline.sequence import Task
from pipeline.tracking import fetch_export

CACHE = Path.home() / ".cache" / "videopoet" / "mlflow"


def run(args: argparse.Namespace) -> tuple[Generated, VideoPoet]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    tasks = [t.value for t in Task if t != Task.UNCONDITIONAL] + [Task.UNCONDITIONAL.value]
    parser.add_argument("--checkpoint", required=True, help="run folder of `videopoet train llm` (or its model/), or "
                                                            "the export in MLflow: runs:/<run_id>/model")
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
    args = parser.parse_args(argv)
    try:
        result, poet = run(args)
    except (ValueError, MediaError, FileNotFoundError) as e:
        print(f"videopoet generate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(out), result.frames, poet.media.fps, result.audio, poet.media.sample_rate)
    tokens = out.with_suffix(".tokens.npz")
    codes = (("video_codes", result.video_codes), ("audio_codes", result.audio_codes),
             ("hr_video_codes", result.hr_video_codes))
    np.savez(tokens, ids=result.ids, **{k: v for k, v in codes if v is not None})
    print(json.dumps({"out": str(out), "tokens": str(tokens), "task": result.task.value, "frames": len(result.frames),
                      "size": list(result.frames.shape[1:3]), "audio": result.audio is not None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
