"""Experiment tracking: MLflow behind a small interface, and a null tracker when tracking is off.

A pipeline run is one parent MLflow run; each stage is a child run (`run.child("tokenize")`). Runs talk to MLflow
through an explicit `MlflowClient`, not the fluent API's process-global active run, so several runs (and processes
such as a Ray Train rank 0) can log side by side. A run is identified by `(tracking_uri, run_id)`: pass that to a
worker and `attach` there.

Embedded default: `sqlite:///<run dir>/mlflow.db` with artifacts in `<run dir>/mlartifacts`. SQLite takes one writer
at a time, so log from the driver or rank 0 only; use a tracking server URI for anything wider.

Experiments are created as model-training experiments (MLflow 3's `mlflow.experimentKind`). MLflow 3.17's UI still
opens every experiment in its GenAI view (traces) until its sidebar switch says "Model training"; `ui_url` gives the
link that opens on the runs and charts.

Lineage is MLflow dataset inputs (`Run.log_dataset`): a manifest, a tokenization's shards, a tokenizer or LLM export,
each named, with a digest that identifies its content (ids hash, tokenization fingerprint, weights
fingerprint), its location, row count and schema, and a context saying what the run did with it (`train`, `val`,
`produced`, `tokenizer`, ...). Exports are artifacts of their run, tagged with their fingerprint, and load back by
`runs:/<run_id>/<path>` (`fetch_export`).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import to_dict
from pipeline.storage import is_uri, redact, redact_values

MAX_PARAM_CHARS = 6000
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view
RUN_FILE = "mlflow_run.json"  # in a run folder: the MLflow run (tracking URI and run id) that a re-run continues


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<run dir>/mlflow.db
    experiment: str = "videopoet"


def check_store(cfg: TrackingConfig, out: str | Path) -> None:
    """Refuse, before any work, an object-store run folder with the embedded store (a SQLite file in a local one)."""
    if cfg.enabled and not cfg.uri and is_uri(str(out)):
        raise ValueError(f"tracking: --out {redact(str(out))} is an object-store URI, so the embedded MLflow store has "
                         "no local folder: set tracking.uri to a tracking server (--set "
                         "tracking.uri=http://HOST:5000), or tracking.enabled=false")


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def ui_url(uri: str, experiment_id: str) -> str:
    """The UI page of an experiment in MLflow's model-training view: the server's own, or for the embedded store the
    one `mlflow ui --backend-store-uri URI` serves. The UI ignores the experiment's kind tag for its view and keeps the
    browser's last choice (GenAI by default); the `workflowType` parameter picks it."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts -> `section.key` params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Run:
    """One MLflow run. Use as a context manager: it ends FINISHED, or FAILED when the block raises."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri=uri)

    @property
    def experiment_id(self) -> str:
        return self._client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        from mlflow.entities import Param

        flat = flatten(to_dict(params) if not isinstance(params, Mapping) else params, prefix)
        batch = [Param(k, _param_value(v)) for k, v in sorted(flat.items())]
        for i in range(0, len(batch), 100):  # MLflow's log_batch limit
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_dataset(self, dataset: "DatasetRecord", context: str) -> None:
        """Record `dataset` as an input of this run, used as `context`."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        entity = Dataset(name=dataset.name, digest=dataset.digest, source_type=dataset.source_type,
                         source=json.dumps({"uri": dataset.source}),
                         schema=json.dumps({"mlflow_colspec": [{"name": n, "type": t} for n, t in dataset.schema]}),
                         profile=json.dumps({"num_rows": dataset.rows}))
        self._client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", context)])])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, filename: str) -> None:
        self.log_text(json.dumps(redact_values(data), indent=2, sort_keys=True, default=str), filename)

    def log_text(self, text: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(filename).name
            path.write_text(text)
            parent = str(Path(filename).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> "Run":
        return _create_run(self.uri, self.experiment_id, name, params, parent_run_id=self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FAILED" if exc_type else "FINISHED")


@dataclass(frozen=True)
class DatasetRecord:
    """What lineage records of a dataset: its content's digest, location, size and columns."""

    name: str
    digest: str
    source: str  # URI or path (credentials redacted)
    rows: int
    schema: tuple[tuple[str, str], ...] = ()  # (column, type)

    @property
    def source_type(self) -> str:
        return self.source.split("://", 1)[0] if "://" in self.source else "local"


class NullRun:
    """The tracker when tracking is off: same interface, records nothing."""

    uri = ""
    run_id = ""

    def log_dataset(self, dataset: DatasetRecord, context: str) -> None: ...
    def log_params(self, params: Any, prefix: str = "") -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: Any, filename: str) -> None: ...
    def log_text(self, text: str, filename: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> "NullRun":
        return NullRun()

    def __enter__(self) -> "NullRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None: ...


def _param_value(value: Any) -> str:
    """A param as MLflow stores it: text, URIs redacted (`pipeline.storage.redact`), cut at MAX_PARAM_CHARS."""
    value = redact_values(value)
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def _create_run(uri: str, experiment_id: str, name: str, params: Mapping[str, Any] | None,
                parent_run_id: str | None = None) -> Run:
    from mlflow.tracking import MlflowClient

    tags = {"mlflow.runName": name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    info = MlflowClient(tracking_uri=uri).create_run(experiment_id, run_name=name, tags=tags).info
    run = Run(uri, info.run_id)
    if params:
        run.log_params(params)
    return run


def _experiment_id(uri: str, name: str, artifact_location: str | None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def start_run(cfg: TrackingConfig, run_dir: str | Path | None, name: str, params: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> Run | NullRun:
    """Open the parent run of a pipeline run (or, with `parent_run_id`, a run nested under an existing one). The
    embedded store lives in `run_dir`; with `cfg.uri` the run folder may be None (say, an object-store URI)."""
    if not cfg.enabled:
        return NullRun()
    if not cfg.uri and run_dir is None:
        raise ValueError("tracking: the embedded MLflow store needs a local run folder; set tracking.uri")
    artifacts = None
    if not cfg.uri:  # only the embedded store gets its artifacts beside it; a server decides its own artifact root
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts = (run_dir.resolve() / "mlartifacts").as_uri()
    uri = cfg.uri or default_uri(run_dir)
    experiment_id = _experiment_id(uri, cfg.experiment, artifacts)
    return _create_run(uri, experiment_id, name, params, parent_run_id)


def attach(uri: str, run_id: str) -> Run | NullRun:
    """Re-open a run in another process (for example rank 0 of a Ray Train job)."""
    return Run(uri, run_id) if run_id else NullRun()


def search_runs(uri: str, experiment: str, filter_string: str = "") -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string)


def fetch_export(location: str, tracking_uri: str, cache: str | Path) -> str | Path:
    """`location` itself (a path or an object-store URI), or for `runs:/<run_id>/<path>` the local folder its run's
    artifacts are downloaded into from `tracking_uri`, under `cache` (once; a finished run's artifacts do not
    change)."""
    if not location.startswith("runs:/"):
        return location
    import mlflow.artifacts

    if not tracking_uri:
        raise ValueError(f"{location}: give the MLflow tracking URI it lives in (--tracking-uri or "
                         "MLFLOW_TRACKING_URI)")
    run_id, _, path = location.removeprefix("runs:/").partition("/")
    target = Path(cache) / run_id / path
    if not target.exists():  # fetched into a fresh folder, then renamed: an interrupted fetch leaves no half export
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            try:
                fetched = mlflow.artifacts.download_artifacts(artifact_uri=location, tracking_uri=tracking_uri,
                                                              dst_path=tmp)
            except Exception as e:  # MLflow raises its own, OS and HTTP errors here
                raise ValueError(f"{location}: cannot fetch it from {tracking_uri}: {e}") from None
            Path(fetched).rename(target)
    return target
