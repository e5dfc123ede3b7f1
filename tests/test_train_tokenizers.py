"""Tokenizer training apps end to end on the training engine: real Ray Train (2 workers, gloo), DeepSpeed, MLflow;
exact resume with the discriminator on; the image-then-video recipe from the CLI."""

import json

import pytest
from safetensors.torch import load_file

from pipeline.checkpoint import load_checkpoint, read_metadata
from pipeline.synth import SynthConfig, write_corpus
from pipeline.tracking import search_runs
from train.cli import main
from workers import run_killing_a_worker

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(out, SynthConfig(width=48, height=48, fps=8, frames=17), 6, seed=1)
    return out / "manifest.jsonl"


def weights(run):
    return load_file(str(run / "tokenizer" / "model.safetensors"))


# A small 3D discriminator that joins at step 2, so a run of 6 steps trains with and without it and the resume at
# step 4 must restore its weights, its optimizer and its LeCam averages.
DISCRIMINATOR = ["--set", "discriminator.enabled=true", "--set", "discriminator.channels=4",
                 "--set", "discriminator.channel_mults=[1, 2]", "--set", "discriminator.start_step=2",
                 "--set", "discriminator.adaptive_weight=true"]


def test_video_tokenizer_trains_and_resumes_exactly_through_a_killed_worker(corpus, tmp_path, ray_local):
    common = ["video-tokenizer", "--config", "debug", "--manifest", str(corpus), "--workers", "2", *DISCRIMINATOR]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--out", str(straight), "--steps", "6"]) == 0
    assert main([*common, "--out", str(resumed), "--steps", "4"]) == 0
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 4
    # Picks up the step-4 checkpoint; a worker killed meanwhile makes Ray Train restart the group from it again.
    final = [*common, "--out", str(resumed), "--steps", "6", "--set", "train.max_failures=1"]
    run_killing_a_worker(lambda: main(final), resumed / "ray" / "video_tokenizer")

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 6
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    model = load_checkpoint(resumed / "tokenizer")  # the export holds the tokenizer alone: strict load
    assert model.fingerprint() == summary["fingerprint"]

    runs = search_runs(f"sqlite:///{resumed / 'mlflow.db'}", "videopoet")
    assert len(runs) == 1  # the resume continued the same MLflow run
    metrics = runs[0].data.metrics
    assert {"loss", "psnr", "val_psnr", "val_ssim", "val_sharpness", "codebook_used", "codebook_perplexity", "lr",
            "gen_adversarial", "adversarial_weight", "disc_loss", "disc_hinge", "disc_lecam"} <= set(metrics)
    artifacts = resumed / "mlartifacts"
    assert list(artifacts.rglob("clip0.png")) and list(artifacts.rglob("model.safetensors"))


def test_audio_tokenizer_trains_with_its_discriminator(corpus, tmp_path, ray_local):
    out = tmp_path / "audio"
    assert main(["audio-tokenizer", "--config", "debug", "--manifest", str(corpus), "--out", str(out),
                 "--workers", "2", "--steps", "2", "--set", "discriminator.enabled=true",
                 "--set", "discriminator.channels=4", "--set", "discriminator.window=128",
                 "--set", "discriminator.hop=32", "--set", "discriminator.strides=[2, 2]"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["modality"] == "audio"
    model = load_checkpoint(out / "tokenizer")
    assert model.fingerprint() == summary["fingerprint"]
    (run,) = search_runs(f"sqlite:///{out / 'mlflow.db'}", "videopoet")
    assert {"val_si_snr", "val_mel_distance", "codebook_used", "si_snr", "spectral", "gen_adversarial",
            "gen_feature_matching", "disc_hinge"} <= set(run.data.metrics)
    assert list((out / "mlartifacts").rglob("clip0_reconstruction.wav"))


def test_image_tokenizer_then_video_tokenizer_from_it(corpus, tmp_path, ray_local):
    common = ["video-tokenizer", "--config", "debug", "--manifest", str(corpus), "--workers", "1", "--steps", "2"]
    assert main([*common, "--out", str(tmp_path / "image"), "--set", "mode=image"]) == 0
    image = json.loads((tmp_path / "image" / "summary.json").read_text())
    assert main([*common, "--out", str(tmp_path / "video"), "--init-image", str(tmp_path / "image" / "tokenizer")]) == 0
    video = read_metadata(tmp_path / "video" / "tokenizer")
    assert video["extra"]["mode"] == "video" and video["extra"]["init_image_fingerprint"] == image["fingerprint"]
    (run,) = search_runs(f"sqlite:///{tmp_path / 'video' / 'mlflow.db'}", "videopoet")
    assert run.data.tags["init_image_fingerprint"] == image["fingerprint"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--init-image", str(tmp_path / "video" / "tokenizer")]) == 2
