"""`videopoet train llm` on a multi-node cluster that loses a node (`benchmarks/multinode.py --app llm`): a 0-CPU head
and three 1-CPU worker nodes (two for the training workers, one for Ray Data); once Ray Train has registered a
checkpoint, a node running a training worker is removed without warning and a fresh one joins. With
`train.max_failures = 1` Ray Train restarts the worker group from that checkpoint (not from step 0), the run finishes
by itself with its export, and the restarted workers continue the same MLflow run, every step trained twice logging
the same loss both times (the resume is exact; `test_train_llm.py` checks a resumed run's weights against an
uninterrupted run's). This is also the suite's worker-failure test: the lost node takes a worker with it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.tracking import search_runs

pytestmark = pytest.mark.heavy

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "multinode.py"
STEPS = 12


def test_a_node_lost_mid_training_resumes_from_the_checkpoint(shards, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(BENCHMARK), "--app", "llm", "--out", str(out), "--nodes", "3", "--",
               "--data", str(shards), "--config", "debug", "--workers", "2", "--steps", str(STEPS),
               "--set", "train.max_failures=1", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=100",
               "--set", "mixture.weights={text_to_video = 1.0, future_prediction = 1.0}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    log = out.parent / "out.log"
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:] + log.read_text()[-4000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    print("multi-node training:", outcome)
    assert outcome["finished_by_itself"], f"the run did not survive the node loss: {outcome}"
    # The restart resumed at a registered checkpoint at or after the one seen before the removal, not at step 0.
    assert 0 < outcome["checkpoint_at_removal"] <= outcome["resumed_at_step"] < STEPS, outcome

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    load_checkpoint(out / "model")  # the export matches its recorded fingerprint

    uri = f"sqlite:///{out / 'mlflow.db'}"
    (run,) = search_runs(uri, "videopoet")  # one run: the restarted workers continue it
    # Sampled on the workers' nodes (Ray Train ranks nodes by IP: the Cluster's nodes share one, so all are node 0).
    assert run.data.metrics["system/node0/system_memory_usage_megabytes"] > 0
    losses: dict[int, list[float]] = {}
    for metric in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(metric.step, []).append(metric.value)
    assert sorted(losses) == list(range(2, STEPS + 1, 2))
    assert all(len(losses[step]) == 1 for step in range(2, outcome["resumed_at_step"] + 1, 2)), (
        f"steps up to the checkpoint of step {outcome['resumed_at_step']} were trained again: {losses}")
    # Batches are a pure function of the step and the resume is exact: a step trained twice logs the same loss.
    for step, values in losses.items():
        assert max(values) - min(values) <= 1e-5, f"step {step} trained twice gave losses {values}"
