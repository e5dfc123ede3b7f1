"""Tokenizing the paper's corpus on paper: the cluster a week takes, from measured per-clip costs.

Measured here: the bytes a clip takes in a shard, through the job's own table and Parquet writer, with the paper's
shapes and uniformly random codes (a trained tokenizer's codes have high entropy too: the demo's perplexities are in
BENCHMARKS.md): video (5, 16, 16) of 2^18 codes, audio (4, 106) of 1,024, optionally the 2x video (5, 32, 32) and a
T5-XL caption embedding (64 x 2048 float16); and the bytes of the frames and audio a decoded clip carries to the
tokenizer actors. Given (from BENCHMARKS.md): tokenizer GFLOP per clip, decode CPU-seconds per clip, the GPU's bf16
peak and the share of it the tokenizers reach. Prints the sizing as a table and one JSON object.

    python benchmarks/paper_scale.py [--clips 270e6] [--days 7] [--video-gflop 4471] [--audio-gflop 12.9]
        [--decode-cpu-s 0.056] [--gpu-tflops 989] [--mfu 0.3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.shards import clips_table  # noqa: E402

CLIPS_PER_SHARD = 4096  # clips of a paper shard (256 inputs of many clips each): Parquet overheads amortized
FRAMES, SIZE, AUDIO_SAMPLES = 17, 128, 34_000


def shard_bytes_per_clip(hr: bool, text: bool) -> float:
    rng = np.random.default_rng(0)
    n = CLIPS_PER_SHARD
    batch = {
        "clip_id": np.array([f"{i // 8:011d}#{i % 8:05d}" for i in range(n)], object),
        "id": np.array([f"{i // 8:011d}" for i in range(n)], object),
        "source": np.array([f"s3://corpus/videos/{i // 8:011d}.mp4" for i in range(n)], object),
        "clip_index": np.arange(n) % 8, "start": (np.arange(n) % 8) * 2.125, "end": (np.arange(n) % 8 + 1) * 2.125,
        "caption": np.array(["a person walking a dog along a beach at sunset"] * n, object),
        "split": np.array(["train"] * n, object), "extras": np.array([None] * n, object),
        "video_tokens": rng.integers(0, 2 ** 18, (n, 5 * 16 * 16)).astype(np.int32),
        "video_shape": np.tile(np.array([5, 16, 16], np.int32), (n, 1)),
        "audio_tokens": rng.integers(0, 1024, (n, 4 * 106)).astype(np.int16),
        "audio_shape": np.tile(np.array([4, 106], np.int32), (n, 1)),
        "has_audio": np.ones(n, bool), "padded_frames": np.zeros(n, np.int64),
        "source_fps": np.full(n, 30.0), "source_width": np.full(n, 1280.0), "source_height": np.full(n, 720.0),
        "source_duration": np.full(n, 17.0),
    }
    if hr:
        batch["hr_video_tokens"] = rng.integers(0, 2 ** 18, (n, 5 * 32 * 32)).astype(np.int32)
        batch["hr_video_shape"] = np.tile(np.array([5, 32, 32], np.int32), (n, 1))
    if text:
        batch["text_embeddings"] = rng.normal(size=(n, 64 * 2048)).astype(np.float16)
        batch["text_shape"] = np.tile(np.array([64, 2048], np.int32), (n, 1))
    sink = pa.BufferOutputStream()
    pq.write_table(clips_table(batch), sink)
    return sink.getvalue().size / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=float, default=270e6)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--video-gflop", type=float, default=4471.0, help="paper MAGVIT encode, one 17x128x128 clip")
    parser.add_argument("--audio-gflop", type=float, default=12.9, help="paper SoundStream encode, 2.125 s")
    parser.add_argument("--decode-cpu-s", type=float, default=0.056, help="ffmpeg + Python CPU-seconds per clip")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.3, help="share of the peak the tokenizers reach")
    args = parser.parse_args()

    seconds = args.days * 86400
    clips_per_s = args.clips / seconds
    gpu_flops = args.gpu_tflops * 1e12 * args.mfu
    sizes = {name: shard_bytes_per_clip(hr, text) for name, hr, text in
             (("base", False, False), ("with_hr", True, False), ("with_text", False, True))}
    decoded = FRAMES * SIZE * SIZE * 3 + AUDIO_SAMPLES * 4  # uint8 frames, float32 audio
    rows = {
        "clips per second, sustained": clips_per_s,
        "GPUs (video + audio tokenizers)": clips_per_s * (args.video_gflop + args.audio_gflop) * 1e9 / gpu_flops,
        "GPUs with the 2x tokens (--hr: 4x the video FLOPs more)": clips_per_s * (5 * args.video_gflop
                                                                                 + args.audio_gflop) * 1e9 / gpu_flops,
        "decode CPU cores": clips_per_s * args.decode_cpu_s,
        "shard bytes per clip": sizes["base"],
        "shard bytes per clip, --hr": sizes["with_hr"],
        "shard bytes per clip, T5-XL embeddings": sizes["with_text"],
        "shards, TB": args.clips * sizes["base"] / 1e12,
        "shards with T5-XL embeddings, TB": args.clips * sizes["with_text"] / 1e12,
        "decoded bytes per clip (frames + audio)": decoded,
        "decode -> tokenizer traffic, MB/s": clips_per_s * decoded / 1e6,
        "decode -> tokenizer traffic, --hr, MB/s": clips_per_s * (decoded + 4 * FRAMES * SIZE * SIZE * 3) / 1e6,
        "token rows into the driver, MB/s": clips_per_s * sizes["base"] / 1e6,
    }
    for name, value in rows.items():
        print(f"{name:58s} {value:>14,.1f}")
    print(json.dumps({"benchmark": "paper_scale", **vars(args), **{k: round(v, 2) for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
