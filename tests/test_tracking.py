import dataclasses
from pathlib import Path

import pytest

from pipeline.tracking import (NullRun, TrackingConfig, attach, default_uri, flatten, search_runs, start_run,
                               ui_url)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    steps: int = 3
    sizes: tuple[int, ...] = (1, 2)


def test_parent_and_child_runs_in_embedded_sqlite(tmp_path):
    cfg = TrackingConfig(experiment="t")
    with start_run(cfg, tmp_path, "pipeline", params={"seed": 1}) as parent:
        with parent.child("stage-a", params=StageConfig()) as child:
            child.log_metrics({"loss": 0.5}, step=1)
            child.log_metrics({"loss": 0.25}, step=2)
            child.log_dict({"a": 1}, "configs/stage.json")
        with pytest.raises(RuntimeError):
            with parent.child("stage-b"):
                raise RuntimeError("boom")
    assert (tmp_path / "mlflow.db").exists()
    runs = {r.info.run_name: r for r in search_runs(default_uri(tmp_path), "t")}
    assert set(runs) == {"pipeline", "stage-a", "stage-b"}
    a, b = runs["stage-a"], runs["stage-b"]
    assert a.data.tags["mlflow.parentRunId"] == parent.run_id
    assert a.data.params == {"steps": "3", "sizes": "[1, 2]"}
    assert a.data.metrics["loss"] == 0.25
    assert a.info.status == "FINISHED" and b.info.status == "FAILED"
    assert runs["pipeline"].data.params == {"seed": "1"}
    artifact = Path(a.info.artifact_uri.removeprefix("file://")) / "configs" / "stage.json"
    assert artifact.exists() and str(tmp_path) in str(artifact)


def test_attach_from_another_handle(tmp_path):
    run = start_run(TrackingConfig(experiment="t"), tmp_path, "p")
    attach(run.uri, run.run_id).log_metrics({"x": 2.0})
    run.finish()
    (found,) = search_runs(run.uri, "t")
    assert found.data.metrics == {"x": 2.0}


def test_null_tracker_records_nothing(tmp_path):
    run = start_run(TrackingConfig(enabled=False), tmp_path, "p")
    assert isinstance(run, NullRun)
    with run as r, r.child("c") as c:
        c.log_metrics({"x": 1.0})
        c.log_params({"a": 1})
    assert not (tmp_path / "mlflow.db").exists()


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_ui_url_opens_the_model_training_view():
    assert ui_url("http://10.0.0.5:5000/", "3") == "http://10.0.0.5:5000/#/experiments/3?workflowType=machine_learning"
    assert ui_url("sqlite:////runs/mlflow.db", "1") == \
        "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"  # where `mlflow ui` serves it
