"""Reconstruction quality of trained tokenizers on any media: PSNR and SSIM (video), SI-SNR (audio), per file.

Every file is decoded with the media module at the clip settings the video tokenizer was trained with (frame size,
8 fps, 17-frame clips, 16 kHz mono); each clip goes through encode -> decode and is compared with its decoded input
(`pipeline.metrics`: PSNR over uint8 pixels of whole clips, SSIM per frame, SI-SNR with both signals mean-removed).
Audio-only files are cut into clip-length windows for SI-SNR; files that yield nothing are listed with their error
and skipped (the clips decoded before damage count); silent clips get no SI-SNR. The last line is one JSON object:
per file and over all clips (PSNR of the pooled squared error, SI-SNR averaged over clips).

    python benchmarks/tokenizer_quality.py --video-tokenizer RUN/video_tokenizer/tokenizer \
        [--audio-tokenizer RUN/audio_tokenizer/tokenizer] FILE_OR_FOLDER... [--max-clips 4]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint, read_metadata
from pipeline.config import from_dict
from pipeline.magvit import tensor_to_video, video_to_tensor
from pipeline.media import MediaConfig, decode, decode_audio
from pipeline.metrics import psnr, si_snr, ssim
from train.runs import RUN_CONFIG_FILE


def media_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if f.suffix.lower() not in (".md", ".jsonl", ".json")) \
            if p.is_dir() else [p]
    return files


def audio_clips(path: str, media: MediaConfig) -> list[np.ndarray]:
    """Consecutive clip-length windows of an audio-only file (at most `media.max_clips`, 0: all)."""
    samples = decode_audio(path, media.sample_rate)
    count = len(samples) // media.clip_samples
    count = min(count, media.max_clips) if media.max_clips else count
    return [samples[i * media.clip_samples: (i + 1) * media.clip_samples] for i in range(count)]


def training_media(tokenizer_dir: Path) -> MediaConfig:
    """The media settings of the run that trained the tokenizer (its run config beside the export)."""
    run_config = tokenizer_dir.parent / RUN_CONFIG_FILE
    if run_config.exists():
        return from_dict(MediaConfig, json.loads(run_config.read_text())["media"])
    return MediaConfig()


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="media files or folders of them")
    parser.add_argument("--video-tokenizer", required=True, help="a tokenizer export (safetensors + config JSON)")
    parser.add_argument("--audio-tokenizer", default=None)
    parser.add_argument("--max-clips", type=int, default=4, help="clips per file (0: all)")
    args = parser.parse_args(argv)
    video = load_checkpoint(args.video_tokenizer).eval()
    audio = load_checkpoint(args.audio_tokenizer).eval() if args.audio_tokenizer else None
    media = replace(training_media(Path(args.video_tokenizer)), max_clips=args.max_clips, audio=audio is not None)

    files, errors = {}, {}
    squared, pixels, snrs = 0.0, 0, []
    for path in media_files(args.inputs):
        result = decode(str(path), media)
        row = {"clips": len(result.clips)}
        sound = [c.audio for c in result.clips if c.audio is not None]
        if result.clips:
            frames = np.stack([c.frames for c in result.clips])
            recon = tensor_to_video(video.decode(video.encode(video_to_tensor(frames)))).numpy()
            row.update(psnr=psnr(frames, recon), ssim=ssim(frames, recon))
            squared += float(np.sum((frames.astype(np.float64) - recon) ** 2))
            pixels += frames.size
        elif audio is not None and result.info is not None and result.info.has_audio:
            sound = audio_clips(str(path), media)  # an audio-only file
        sound = [a for a in sound if np.abs(a).max() > 0]
        if audio is not None and sound:
            x = np.stack(sound).astype(np.float32)
            y = audio.decode(audio.encode(torch.from_numpy(x))).numpy()
            clip_snrs = [si_snr(x[i: i + 1, : y.shape[1]], y[i: i + 1]) for i in range(len(y))]
            row.update(audio_clips=len(sound), si_snr=float(np.mean(clip_snrs)))
            snrs += clip_snrs
        if len(row) == 1:
            errors[path.name] = str(result.error or "no clips")
            continue
        files[path.name] = row
        print(f"{path.name:32} {row['clips']:3} clips" + (f"  PSNR {row['psnr']:6.2f} dB  SSIM {row['ssim']:.3f}"
                                                           if "psnr" in row else " " * 31)
              + (f"  SI-SNR {row['si_snr']:6.2f} dB ({row['audio_clips']} clips)" if "si_snr" in row else ""),
              flush=True)
    for name, error in errors.items():
        print(f"{name:32} skipped: {error}")
    overall = {"clips": sum(r["clips"] for r in files.values()),
               "psnr": float(10 * np.log10(255.0**2 / (squared / pixels))) if pixels else None,
               "si_snr": float(np.mean(snrs)) if snrs else None}
    print(json.dumps({"benchmark": "tokenizer_quality", "frame_size": [media.height, media.width],
                      "video_tokenizer": read_metadata(args.video_tokenizer)["fingerprint"],
                      "audio_tokenizer": read_metadata(args.audio_tokenizer)["fingerprint"] if audio else None,
                      "overall": overall, "files": files, "skipped": errors}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
