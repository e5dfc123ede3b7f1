"""A training worker dies mid-run: with `train.max_failures = 1`, `videopoet train llm` (2 Ray Train workers,
DeepSpeed ZeRO-3) replaces the worker group, resumes from the last registered checkpoint (not from step 0) and
finishes. Batches are a pure function of the step and the resume is exact, so every step trained twice logs the same
loss both times. (`test_train_llm.py` checks that a resumed run's weights equal an uninterrupted run's.)"""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray.train import Result

from pipeline.checkpoint import load_checkpoint
from pipeline.tracking import search_runs
from train.cli import main

pytestmark = pytest.mark.heavy

STEPS = 16
WORKER_TITLE = "ray::RayTrainWorker"


def train_workers() -> list[psutil.Process]:
    """This session's Ray Train workers: the embedded Ray's raylet is a child of this process and spawns the workers,
    whose process title Ray sets to `ray::RayTrainWorker...`; other users' Ray clusters are not descendants."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith(WORKER_TITLE):
                workers.append(process)
        except psutil.Error:  # exited while being listed
            continue
    return workers


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart resumes from; a
    checkpoint folder on disk may not be registered yet), or 0."""
    try:
        result = Result.from_path(run_dir)
    except (RuntimeError, ValueError):  # no run folder or snapshot yet, or a snapshot being rewritten
        return 0
    return result.metrics["step"] if result.checkpoint else 0


def kill_a_worker(run_dir: Path, finished: threading.Event) -> dict:
    """SIGKILL one training worker once a checkpoint is registered, then watch for the replacement workers.

    Returns the registered step at the kill and whether new workers started before the run finished."""
    killed: dict = {}
    while not finished.is_set():
        pids = {worker.pid for worker in train_workers()}
        if not killed:
            step = registered_step(run_dir)
            if step and pids:
                psutil.Process(min(pids)).send_signal(signal.SIGKILL)
                killed = {"step": step, "workers": pids, "replaced": False}
        elif pids - killed["workers"]:
            return {**killed, "replaced": True}
        time.sleep(0.2)
    return killed


def test_killed_worker_resumes_from_the_last_checkpoint(shards, tmp_path):
    common = ["llm", "--config", "debug", "--data", str(shards), "--workers", "2", "--steps", str(STEPS),
              "--set", "train.max_failures=1", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=100",
              "--set", "mixture.weights={text_to_video = 1.0, future_prediction = 1.0}"]
    failed = tmp_path / "failed"

    finished = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_a_worker, failed / "ray" / "llm", finished)
        try:
            assert main([*common, "--out", str(failed)]) == 0
        finally:
            finished.set()
    kill = killed.result()
    assert kill, "no training worker was killed: the run ended before Ray Train registered a checkpoint"
    assert kill["replaced"], f"Ray Train did not restart the workers after the kill: {kill}"

    summary = json.loads((failed / "summary.json").read_text())
    assert summary["steps"] == STEPS
    load_checkpoint(failed / "model")  # the export matches its recorded fingerprint

    # rank 0 logs the loss every 2 steps. The replacement workers resume at a registered checkpoint at or after the
    # one seen before the kill, so the steps up to it are logged once; a restart from scratch would log them twice.
    uri = f"sqlite:///{failed / 'mlflow.db'}"
    (run,) = search_runs(uri, "videopoet")
    losses: dict[int, list[float]] = {}
    for metric in MlflowClient(uri).get_metric_history(run.info.run_id, "loss"):
        losses.setdefault(metric.step, []).append(metric.value)
    assert sorted(losses) == list(range(2, STEPS + 1, 2))
    assert all(len(losses[step]) == 1 for step in range(2, kill["step"] + 1, 2)), (
        f"training did not resume from the checkpoint of step {kill['step']}: loss logged per step {losses}")
    for step, values in losses.items():
        assert max(values) - min(values) <= 1e-5, f"step {step} trained twice gave losses {values}"
