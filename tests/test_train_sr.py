"""`videopoet train sr` end to end: tokenize job shards with --hr -> Ray Train + DeepSpeed ZeRO-3 (2 CPU workers) ->
export, with an exact resume, MLflow metrics and the export upsampling codes as a generation stage."""

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from pipeline.config import load_config
from pipeline.generation import SuperResStage
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.shards import open_shards
from pipeline.superres import SuperResConfig
from pipeline.synth import SynthConfig, write_corpus
from pipeline.tracking import search_runs
from tokenize_jobs.cli import tokenize
from train.cli import main
from train.superres import SRTrainConfig, check_shards

pytestmark = pytest.mark.heavy

# 5-frame 16x16 clips (2x: 32x32) through the debug tokenizer (8x space, 4x time): (2, 2, 2) -> (2, 4, 4) codes of
# 8 bits, the grids of the debug super-resolution flavor.
MEDIA = ["--set", "media.height=16", "--set", "media.width=16", "--set", "media.clip_frames=5",
         "--set", "media.stride_frames=5", "--set", "media.audio=false"]


@pytest.fixture(scope="module")
def hr_shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("sr-data")
    write_corpus(root / "corpus", SynthConfig(width=32, height=32, fps=8, frames=5), 10, seed=0)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    assert tokenize(["--manifest", str(root / "corpus" / "manifest.jsonl"), "--out", str(root / "shards"),
                     "--video-tokenizer", str(root / "video"), "--config", "debug", "--hr", *MEDIA]) == 0
    return root / "shards"


def test_sr_trains_resumes_exactly_through_a_killed_worker_and_exports(hr_shards, trained_straight_and_resumed):
    resumed = trained_straight_and_resumed(main, ["sr", "--config", "debug", "--data", str(hr_shards),
                                                  "--workers", "2"], killed="superres")
    load_checkpoint(resumed / "model")  # checks the weights against the recorded fingerprint
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4
    assert read_metadata(resumed / "model")["fingerprint"] == summary["fingerprint"]
    assert (resumed / "model" / "words.json").exists()

    (run,) = search_runs(f"sqlite:///{resumed / 'mlflow.db'}", "videopoet")
    metrics = run.data.metrics
    assert {"loss", "accuracy", "factor_accuracy", "lr", "tokens_per_s", "val_loss", "val_accuracy"} <= set(metrics)
    assert 0 <= metrics["accuracy"] <= metrics["factor_accuracy"] <= 1 and metrics["tokens_per_s"] > 0

    stage = SuperResStage.load(resumed / "model")
    (row,) = open_shards(str(hr_shards)).to_table(["video_tokens", "video_shape"]).slice(0, 1).to_pylist()
    lr = np.asarray(row["video_tokens"]).reshape(row["video_shape"])
    hr = stage.upsample(lr, prompt="a red circle moving left", seed=1)
    assert hr.shape == (2, 4, 4) and 0 <= hr.min() and hr.max() < 256
    assert stage.decode_video(hr).shape == (5, 32, 32, 3)


def test_shards_that_do_not_fit_the_model_are_named(hr_shards):
    model = load_config(SRTrainConfig, "debug", kind={"": "train_sr", "model": "superres"}).model
    check_shards(open_shards(str(hr_shards)), model)
    with pytest.raises(ValueError, match="8-bit codes but model.bits = 12"):
        check_shards(open_shards(str(hr_shards)), replace(model, bits=12))
    with pytest.raises(ValueError, match=r"codes \(2, 2, 2\) -> \(2, 4, 4\), but the model maps"):
        check_shards(open_shards(str(hr_shards)), SuperResConfig(grid=(2, 8, 8), windows=((2, 4, 4),), bits=8))


def test_cli_rejects_a_bad_config(hr_shards, tmp_path, capsys):
    assert main(["sr", "--config", "debug", "--data", str(hr_shards), "--out", str(tmp_path / "x"),
                 "--set", "model.grid=[2, 4, 3]"]) == 2
    assert "h and w must be multiples of 2" in capsys.readouterr().err
