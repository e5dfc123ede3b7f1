"""`benchmarks/gpu_check.sh`, the one-command check of every CUDA path: its CPU dry run (debug flavors, tiny sizes)
runs every part to the end and reports each one passed, so that the script and the benchmarks it drives cannot rot
on machines without a GPU; a failing part makes it exit non-zero; bad arguments get a message. And the generation
code that the eval stage's GPU actors run keeps its tokenizers' tensors on their device (checked on the stand-in
device of tests/test_device.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.generation import VideoPoet
from pipeline.media import MediaConfig
from test_device import device_check, to_device

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ["train", "tokenizer", "tokenize_job", "generate", "superres", "eval"]


def run(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(cwd / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_bad_arguments_are_refused_with_a_message():
    result = run("--dry-run", "--frobnicate")
    assert result.returncode == 2 and "unknown argument '--frobnicate'" in result.stderr
    result = run("--dry-run", "--only", "train,sampling")
    assert result.returncode == 2 and "unknown part 'sampling'" in result.stderr
    assert run("--only").returncode == 2
    if not torch.cuda.is_available():
        result = run()
        assert result.returncode == 2 and "--dry-run" in result.stderr


def test_a_failing_part_fails_the_check(tmp_path):
    """The script in a folder of stand-in benchmarks: one prints its figures, one fails after printing some."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(SCRIPT, tmp_path / "benchmarks")
    (tmp_path / "benchmarks" / "generate.py").write_text('print("warming up")\nprint(\'{"cached_tokens_per_s": 5.0, '
                                                         '"ratio": 2.0}\')\n')
    (tmp_path / "benchmarks" / "superres.py").write_text('print(\'{"ratio": 1.0}\')\nraise SystemExit(3)\n')
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = run("--dry-run", "--only", "generate,superres", "--out", str(tmp_path / "out"), cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert not summary["ok"] and summary["failed"] == ["superres"] and "targets" not in summary
    assert summary["parts"]["generate"]["ok"] and summary["parts"]["generate"]["figures"]["ratio"] == 2.0
    assert summary["headline"]["generate_tokens_per_s"] == 5.0
    assert summary["parts"]["superres"]["exit"] == 3 and not summary["parts"]["superres"]["timed_out"]
    assert "superres: failed (exit 3)" in result.stderr


@pytest.mark.heavy
def test_dry_run_passes_every_part(tmp_path):
    result = run("--dry-run", "--out", str(tmp_path), timeout=900)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, result.stderr + logs
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "dry-run" and summary["ok"] and summary["failed"] == []
    assert list(summary["parts"]) == PARTS
    for name, part in summary["parts"].items():
        assert part["ok"] and part["exit"] == 0 and part["seconds"] <= part["limit_s"], name
        assert part["figures"]["ratio"] is not None, name
    train = summary["parts"]["train"]["figures"]
    assert train["trainer_mfu"] > 0 and train["trainer_peak_memory_gib"] > 0 and train["peak_dtype"] == "float32"
    assert summary["parts"]["generate"]["figures"]["identical"]
    assert summary["parts"]["eval"]["figures"]["ratio"] == 1.0
    on_cpu = {"tokenize_job_clips_per_s_per_gpu", "llm_mfu_vs_989"}  # per GPU, and vs the H100 spec: none on a CPU
    assert all(value is not None for name, value in summary["headline"].items() if name not in on_cpu)


def test_generation_runs_its_tokenizers_on_their_device(llm_export):
    """What an eval Generate actor on a GPU does: conditions are encoded and codes decoded on the tokenizers' device,
    host arrays in and out."""
    media = MediaConfig(height=32, width=32)
    poet = VideoPoet.load(llm_export(["a red circle moving left"], media) / "run" / "model")
    to_device(poet.video_tokenizer)
    to_device(poet.audio_tokenizer)
    frames = np.random.default_rng(0).integers(0, 256, (media.clip_frames, 32, 32, 3), dtype=np.uint8)
    with device_check():
        codes = poet.encode_video(frames)
        decoded = poet.decode_video(codes)
        audio_codes = poet.encode_audio(np.zeros(media.clip_samples, np.float32))
        audio = poet.decode_audio(audio_codes)
    assert codes.shape == poet.latent_grid and decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert audio_codes.shape == poet.audio_grid and audio.shape == (media.clip_samples,)
