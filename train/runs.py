"""A training run's folder on the driver: a local path or an object-store URI, its files, its lock and its MLflow run.

On a cluster the nodes share no disk, so a run folder can be `s3://bucket/runs/llm` (any pyarrow filesystem): the
checkpoints go there through Ray Train's storage (`train.engine.fit`), and the driver's files (resolved config, word
vocabulary, MLflow run record, summary, the export) through pyarrow, each written atomically. MLflow then needs a
tracking server (`tracking.uri`): the embedded SQLite store lives in a local folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.checkpoint import CONFIG_FILE, read_metadata
from pipeline.storage import (check_folder, exclusive, is_uri, owner_record, redact, redact_values, resolve_filesystem,
                              staged_folder, write_atomic)
from pipeline.tracking import RUN_FILE, attach, check_store, start_run

RUN_CONFIG_FILE = "run_config.json"  # the app's resolved config
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"  # held by the run's driver


class RunFolder:
    def __init__(self, location: str | Path):
        location = str(location)
        self.remote = is_uri(location)
        self.location = location.rstrip("/") if self.remote else str(Path(location).resolve())
        self.fs, self.root = resolve_filesystem(check_folder(self.location))

    def __str__(self) -> str:
        return redact(self.location)

    def uri(self, name: str) -> str:
        """Where `name` lives, as a user would give it to another command."""
        return f"{self.location}/{name}" if self.remote else os.path.join(self.location, name)

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.fs, self._path(name), lambda out: out.write(text.encode()))

    @contextlib.contextmanager
    def hold(self, job: str) -> Iterator[None]:
        """The folder, created and held for this process: a second run on it is refused (`Busy`, naming the
        holder) instead of sharing checkpoints and temporaries with the first."""
        self.fs.create_dir(self.root, recursive=True)
        with exclusive(self.fs, self._path(LOCK_FILE), owner_record(job=job), f"--out {self}"):
            yield

    @contextlib.contextmanager
    def export_dir(self, name: str) -> Iterator[Path]:
        """A local folder to write the export `name` into: the run folder's own, or a temporary one whose files are
        uploaded when the block succeeds, the config last (a reader sees an export only once it is whole)."""
        with staged_folder(self.uri(name), last=(CONFIG_FILE,)) as folder:
            yield folder


def write_run_config(folder: RunFolder, config: Mapping[str, Any]) -> None:
    folder.write_text(RUN_CONFIG_FILE, json.dumps(redact_values(config), indent=2) + "\n")


def write_summary(folder: RunFolder, run: Any, summary: dict[str, Any]) -> None:
    text = json.dumps(redact_values(summary), indent=2) + "\n"
    folder.write_text(SUMMARY_FILE, text)
    run.log_text(text, SUMMARY_FILE)


def open_run(app: Any, folder: RunFolder, name: str, parent):
    """The run's MLflow run: a child of `parent`, or the run of a previous invocation being resumed, or a new one."""
    if parent is not None:
        return parent.child(name, app)
    saved = folder.read_text(RUN_FILE)
    if saved is not None:
        saved = json.loads(saved)
        return attach(saved["uri"], saved["run_id"])
    check_store(app.tracking, folder.location)
    run = start_run(app.tracking, None if folder.remote else folder.location, name, params=app)
    folder.write_text(RUN_FILE, json.dumps({"uri": run.uri, "run_id": run.run_id}) + "\n")
    return run


def log_export(run: Any, export: Path, artifact_path: str) -> str:
    """The export as an artifact of its run (loadable as `runs:/<run_id>/<artifact_path>`), its fingerprint as the
    tag `videopoet.model_fingerprint` (one name for every kind of export); returns the fingerprint."""
    fingerprint = read_metadata(export)["fingerprint"]
    run.log_artifact(export, artifact_path)
    run.set_tags({"videopoet.model_fingerprint": fingerprint})
    return fingerprint
