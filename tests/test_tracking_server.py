"""MLflow behind a tracking server, as a team runs it: `mlflow server` on 127.0.0.1 with a SQLite backend that only
the server opens and artifacts proxied to a separate folder; the tokenize job and `train llm` (rank 0 logging from
inside its Ray Train worker) talk to it over HTTP; the runs are read back from its REST API, an export loads by
`runs:/`, and, where Chromium is installed, the UI's runs page and a run's metrics page are screenshotted."""

import os
import re
import shutil
import subprocess

import numpy as np
import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

import apps.generate
from apps.cli import generate
from pipeline.checkpoint import read_metadata
from pipeline.shards import open_shards
from pipeline.tracking import ui_url
from servers import stop
from tokenize_jobs.cli import tokenize
from train.cli import main as train

pytestmark = pytest.mark.heavy


def browse(browser, url, png, profile):
    """The text of `url` as headless Chromium renders it, with a screenshot in `png`, once the single-page app has had
    its (virtual) time to fetch and draw; the screenshot must not be blank."""
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=15000",
                             "--dump-dom", f"--screenshot={png}", url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        dom = proc.communicate(timeout=120)[0].decode()
    finally:
        stop(proc, grace_s=5)
    colors = len(np.unique(np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3), axis=0))
    assert colors > 16, f"{png}: {colors} colors, a blank page"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)))


def database_holders(db):
    """Processes with `db` open."""
    holders = set()
    for proc in psutil.process_iter():
        try:
            if any(f.path == str(db) for f in proc.open_files()):
                holders.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return holders


def test_stages_log_to_a_tracking_server_and_the_ui_shows_them(tracking_server, shards, tmp_path, monkeypatch):
    uri, server_pid = tracking_server
    root = shards.parent  # the session's corpus and debug tokenizers
    # The tokenize job on a copy of the session's shards: every shard is already done, so it only checks them and
    # logs its run (summary, lineage) to the server.
    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    assert tokenize(["--manifest", str(root / "corpus" / "manifest.jsonl"), "--out", str(data),
                     "--video-tokenizer", str(root / "video"), "--audio-tokenizer", str(root / "audio"),
                     "--config", "debug", "--tracking-uri", uri]) == 0
    out = tmp_path / "llm"
    assert train(["llm", "--config", "debug", "--data", str(data), "--out", str(out), "--quiet",
                  "--set", "mixture.weights={text_to_video = 1.0}", "--set", "train.system_metrics_s=1",
                  "--set", f"tracking.uri='{uri}'"]) == 0

    # Only the server opened a database, and the artifacts went to its artifact root.
    server = tmp_path / "server"
    assert sorted(tmp_path.rglob("*.db")) == [server / "mlflow.db"] and not list(root.rglob("*.db"))
    holders = database_holders(server / "mlflow.db")  # `mlflow server` (it creates the schema) and its uvicorn worker
    assert holders and {os.getsid(pid) for pid in holders} == {server_pid}
    assert list((server / "artifacts").rglob("model.safetensors")) and not list(tmp_path.rglob("mlartifacts"))

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("videopoet")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tokenize", "llm"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    llm = runs["llm"]

    # The loss chart's data, as the UI fetches it: a point per logging step, logged by rank 0 in its worker.
    history = requests.get(f"{uri}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": llm.info.run_id, "metric_key": "loss"}, timeout=30).json()["metrics"]
    assert sorted(m["step"] for m in history) == [2, 4] and all(m["value"] > 0 for m in history)
    system = {k for k in llm.data.metrics if k.startswith("system/")}
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= system
    cpu = client.get_metric_history(llm.info.run_id, "system/node0/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == [2, 4] and all(m.value > 0 for m in cpu)  # a reading at every logged step

    # Lineage over HTTP: the shards the tokenize job wrote are the ones the LLM trained on.
    fingerprint = open_shards(str(data)).fingerprint
    logged = {d.tags[0].value: d.dataset.digest for d in client.get_run(llm.info.run_id).inputs.dataset_inputs}
    produced = {d.tags[0].value: d.dataset.digest
                for d in client.get_run(runs["tokenize"].info.run_id).inputs.dataset_inputs}
    assert logged["train"] == logged["val"] == produced["output"] == fingerprint
    assert logged["video_tokenizer"] == produced["video_tokenizer"]
    export = read_metadata(out / "model")["fingerprint"]
    assert llm.data.tags["videopoet.model_fingerprint"] == export

    # `videopoet generate` loads the export from the server's artifact store.
    monkeypatch.setattr(apps.generate, "CACHE", tmp_path / "cache")
    assert generate(["--checkpoint", f"runs:/{llm.info.run_id}/model", "--tracking-uri", uri, "--task",
                     "text_to_image", "--prompt", "a red circle moving left", "--out", str(tmp_path / "a.mp4")]) == 0
    assert read_metadata(tmp_path / "cache" / llm.info.run_id / "model")["fingerprint"] == export
    assert (tmp_path / "a.mp4").stat().st_size > 0

    browser = shutil.which("chromium") or shutil.which("/usr/bin/chromium")
    if browser is None:
        print("no chromium on this machine: the UI pages are not checked")
        return
    # The link the demo prints opens the runs table, in the UI's model-training view, with the Dataset column filled.
    runs_page = browse(browser, ui_url(uri, experiment.experiment_id), tmp_path / "runs.png", tmp_path / "profile-1")
    assert "Run Name" in runs_page and " llm " in runs_page and " tokenize " in runs_page
    assert f"({fingerprint}) train" in runs_page and "Detect Issues" not in runs_page
    metrics_url = f"{uri}/#/experiments/{experiment.experiment_id}/runs/{llm.info.run_id}/model-metrics"
    metrics_page = browse(browser, f"{metrics_url}?workflowType=machine_learning", tmp_path / "metrics.png",
                          tmp_path / "profile-2")
    assert "Model metrics (" in metrics_page and "loss (" in metrics_page
