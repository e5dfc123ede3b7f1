import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the session's Ray Data and Ray Train tests."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()
