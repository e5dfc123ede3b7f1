"""Killing a Ray Train worker of this test session mid-run, as a lost node would: for the apps' failure tests."""

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import psutil
from ray.train import Result

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


def run_killing_a_worker(train: Callable[[], int], run_dir: Path) -> dict:
    """Run `train` (an app's `main`, with `train.max_failures >= 1`) while one of its workers is SIGKILLed once Ray
    Train has registered a checkpoint in `run_dir`; asserts that the app succeeded and its workers were replaced.
    Returns the registered step at the kill."""
    finished = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(kill_a_worker, run_dir, finished)
        try:
            assert train() == 0
        finally:
            finished.set()
    kill = killed.result()
    assert kill, "no training worker was killed: the run ended before Ray Train registered a checkpoint"
    assert kill["replaced"], f"Ray Train did not restart the workers after the kill: {kill}"
    return kill
