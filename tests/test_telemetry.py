"""The training job's system metrics sampler on its own: every reading it hands out is a measurement, including the
sampling thread's first one and a reading taken in a logging window shorter than the sampling period."""

import subprocess
import sys
import time

import psutil
import pytest

from train.telemetry import NodeSampler


@pytest.fixture
def busy_cpu():
    """A process spinning on one core, so the machine's CPU utilization is well above zero."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield
    proc.kill()
    proc.wait()


def wait_for_a_sample(sampler: NodeSampler, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(monitor.metrics for monitor in sampler.monitors):
        assert time.monotonic() < deadline, "the sampling thread took no sample"
        time.sleep(0.01)


def test_the_sampling_threads_first_reading_is_a_measurement(busy_cpu):
    sampler = NodeSampler(interval_s=0.5)
    try:
        wait_for_a_sample(sampler)
        taken = sampler.take()  # exactly the thread's first sample: psutil keeps one baseline per calling thread
    finally:
        sampler.close()
    reference = psutil.cpu_percent(interval=0.5)
    assert reference > 10
    assert taken["cpu_utilization_percentage"] > 10, (taken, reference)
    assert 0 < taken["system_memory_usage_megabytes"] < psutil.virtual_memory().total / 1e6


def test_a_window_shorter_than_the_period_still_gets_a_reading(busy_cpu):
    sampler = NodeSampler(interval_s=60.0)
    try:
        readings = []
        for _ in range(3):
            time.sleep(0.2)
            readings.append(sampler.take()["cpu_utilization_percentage"])
    finally:
        sampler.close()
    assert all(r > 10 for r in readings), readings
