"""`videopoet train llm` end to end: tokenize job shards -> Ray Train + DeepSpeed ZeRO-3 (2 CPU workers) -> export,
with an exact resume and MLflow metrics per task."""

import json

import pytest

from pipeline.checkpoint import load_checkpoint, read_metadata
from pipeline.tracking import search_runs
from train.cli import main

pytestmark = pytest.mark.heavy


def test_llm_trains_resumes_exactly_and_exports(shards, trained_straight_and_resumed):
    resumed = trained_straight_and_resumed(main, [
        "llm", "--config", "debug", "--data", str(shards), "--workers", "2",
        "--set", "mixture.weights={text_to_video = 1.0, video_to_audio = 1.0, future_prediction = 1.0}"])
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4
    load_checkpoint(resumed / "model")  # checks the weights against the recorded fingerprint
    assert read_metadata(resumed / "model")["fingerprint"] == summary["fingerprint"]
    assert (resumed / "model" / "words.json").exists()

    (run,) = search_runs(f"sqlite:///{resumed / 'mlflow.db'}", "videopoet")
    metrics = run.data.metrics
    assert {"loss", "lr", "tokens_per_s", "mfu", "padding", "val_loss"} <= set(metrics)
    assert any(k.startswith("loss/") for k in metrics) and any(k.startswith("val_loss/") for k in metrics)
    assert 0 < metrics["mfu"] < 1
