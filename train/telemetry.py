"""System metrics of every node a training job runs on (CPU, memory, GPUs), logged to the job's one MLflow run.

On each node, the first worker samples its machine from a thread with MLflow's own collectors (so metric names are
MLflow's: `cpu_utilization_percentage`, `system_memory_usage_megabytes`, `gpu_0_utilization_percentage`, ...). At
every logging step all ranks gather their samples and rank 0 logs them as `system/node<k>/<name>`, the layout MLflow's
system-metrics view groups by node. Only rank 0 writes to the tracking store, so the embedded SQLite store keeps its
single writer.
"""

from __future__ import annotations

import threading
from typing import Any

import psutil


class NodeSampler:
    """Averages of this machine's system metrics since the last `take`, sampled every `interval_s` seconds, and at a
    `take` that found no sample (a logging window shorter than the period), so that every logged step has them."""

    def __init__(self, interval_s: float):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self.monitors: list[Any] = [CPUMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError):  # no NVML library or no GPU: CPU and memory only
            pass
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # psutil's CPU percentage is over the time since the calling thread's previous call, and a thread's first call
        # returns 0.0: prime it in this thread (for `take`) and in the sampling thread, so every sample is a reading.
        psutil.cpu_percent()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            for monitor in self.monitors:
                monitor.collect_metrics()

    def _run(self) -> None:
        psutil.cpu_percent()
        while not self._stop.wait(self.interval_s):
            self._sample()

    def take(self) -> dict[str, float]:
        if not any(monitor.metrics for monitor in self.monitors):
            self._sample()
        with self._lock:
            merged: dict[str, float] = {}
            for monitor in self.monitors:
                if monitor.metrics:
                    merged.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        return merged

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def gather(sampler: NodeSampler | None, node_rank: int) -> dict[str, float]:
    """Every node's samples as `system/node<k>/<name>` on rank 0 (collective: every rank calls it)."""
    import torch.distributed as dist

    sample = None if sampler is None else {"node": node_rank, **sampler.take()}
    samples = [None] * dist.get_world_size()
    dist.all_gather_object(samples, sample)
    metrics = {}
    for found in filter(None, samples):
        node = found.pop("node")
        metrics.update({f"system/node{node}/{k}": float(v) for k, v in found.items()})
    return metrics
