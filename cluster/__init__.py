"""The Ray helpers every distributed part of the project shares (tokenize jobs, training, evaluation).

`pipeline/` never imports Ray; `tokenize_jobs/`, `train/` and `eval/` get their Ray session from here, so joining a
cluster works the same way everywhere: under `ray job submit` (or with RAY_ADDRESS set) an app joins that cluster,
otherwise it starts an embedded local Ray in-process.
"""

from __future__ import annotations

import os

LOGS_VARIABLE = "VIDEOPOET_RAY_LOGS"  # "0": keep the workers' output out of the driver's console

# Ray Train's controller polls its workers every 2 s by default, and a run ends, a queued checkpoint report lands and a
# dead worker is noticed only at a poll: up to 2 s each, 4-5 s at the end of every run. Polls are cheap on one machine.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def local_ray_env() -> None:
    """Defaults for the Ray processes that this process starts, which inherit its environment (a value set wins)."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), or start an embedded local Ray."""
    import ray

    if not ray.is_initialized():
        local_ray_env()
        ray.init(log_to_driver=os.environ.get(LOGS_VARIABLE, "1") == "1")


def gpu_count() -> int:
    """GPUs in the cluster (0 on a CPU-only cluster or laptop)."""
    import ray

    init_ray()
    return int(ray.cluster_resources().get("GPU", 0))
