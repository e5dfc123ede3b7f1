"""A training worker dies mid-run: with `train.max_failures = 1`, `videopoet train llm` (2 Ray Train workers,
DeepSpeed ZeRO-3) replaces the worker group, resumes from the last registered checkpoint (not from step 0) and
finishes. Batches are a pure function of the step and the resume is exact, so every step trained twice logs the same
loss both times. (`test_train_llm.py` checks that a resumed run's weights equal an uninterrupted run's.)"""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.tracking import search_runs
from train.cli import main
from workers import run_killing_a_worker

pytestmark = pytest.mark.heavy

STEPS = 16


def test_killed_worker_resumes_from_the_last_checkpoint(shards, tmp_path):
    common = ["llm", "--config", "debug", "--data", str(shards), "--workers", "2", "--steps", str(STEPS),
              "--set", "train.max_failures=1", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=100",
              "--set", "mixture.weights={text_to_video = 1.0, future_prediction = 1.0}"]
    failed = tmp_path / "failed"

    kill = run_killing_a_worker(lambda: main([*common, "--out", str(failed)]), failed / "ray" / "llm")

    summary = json.loads((failed / "summary.json").read_text())
    assert summary["steps"] == STEPS
    load_checkpoint(failed / "model")  # the export matches its recorded fingerprint

    # rank 0 logs the loss every 2 steps. The replacement workers resume at a registered checkpoint at or after the
    # one seen before the kill, so the steps up to it are logged once; a restart from scratch would log them twice.
    uri = f"sqlite:///{failed / 'mlflow.db'}"
    (run,) = search_runs(uri, "videopoet")  # one run: the restarted workers continue it
    assert run.data.metrics["system/node0/system_memory_usage_megabytes"] > 0  # sampled on the workers' node
    losses: dict[int, list[float]] = {}
    for metric in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(metric.step, []).append(metric.value)
    assert sorted(losses) == list(range(2, STEPS + 1, 2))
    assert all(len(losses[step]) == 1 for step in range(2, kill["step"] + 1, 2)), (
        f"training did not resume from the checkpoint of step {kill['step']}: loss logged per step {losses}")
    for step, values in losses.items():
        assert max(values) - min(values) <= 1e-5, f"step {step} trained twice gave losses {values}"
