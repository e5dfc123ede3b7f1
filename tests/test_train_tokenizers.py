"""Tokenizer training apps end to end: real Ray Train (2 workers, DDP over gloo), real MLflow, exact resume."""

import json

import pytest
from safetensors.torch import load_file

from pipeline.checkpoint import load_checkpoint
from pipeline.synth import SynthConfig, write_corpus
from pipeline.tracking import search_runs
from train.cli import main

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SynthConfig(width=48, height=48, fps=8, frames=17), 6, seed=1)
    return out / "manifest.jsonl"


def weights(run):
    return load_file(str(run / "tokenizer" / "model.safetensors"))


def test_video_tokenizer_trains_and_resumes_exactly(corpus, tmp_path, ray_local):
    common = ["video-tokenizer", "--config", "debug", "--manifest", str(corpus), "--workers", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--out", str(straight), "--steps", "6"]) == 0
    assert main([*common, "--out", str(resumed), "--steps", "4"]) == 0
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4
    assert main([*common, "--out", str(resumed), "--steps", "6"]) == 0  # picks up the step-4 checkpoint

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 6
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    model = load_checkpoint(resumed / "tokenizer")
    assert model.fingerprint() == summary["fingerprint"]

    runs = search_runs(f"sqlite:///{resumed / 'mlflow.db'}", "videopoet")
    assert len(runs) == 1  # the resume continued the same MLflow run
    metrics = runs[0].data.metrics
    assert {"loss", "psnr", "val_psnr", "val_ssim", "codebook_used", "codebook_perplexity", "lr"} <= set(metrics)
    artifacts = resumed / "mlartifacts"
    assert list(artifacts.rglob("clip0.png")) and list(artifacts.rglob("model.safetensors"))


def test_audio_tokenizer_trains(corpus, tmp_path, ray_local):
    out = tmp_path / "audio"
    assert main(["audio-tokenizer", "--config", "debug", "--manifest", str(corpus), "--out", str(out),
                 "--workers", "2", "--steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["modality"] == "audio"
    model = load_checkpoint(out / "tokenizer")
    assert model.fingerprint() == summary["fingerprint"]
    (run,) = search_runs(f"sqlite:///{out / 'mlflow.db'}", "videopoet")
    assert {"val_si_snr", "val_mel_distance", "codebook_used", "si_snr", "spectral"} <= set(run.data.metrics)
    assert list((out / "mlartifacts").rglob("clip0_reconstruction.wav"))
