"""`videopoet train llm` end to end: tokenize job shards -> Ray Train + DeepSpeed ZeRO-3 (2 CPU workers) -> export,
with an exact resume and MLflow metrics per task."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import pyarrow.fs as pa_fs
import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint, read_metadata
from pipeline.shards import open_shards
from pipeline.tracking import search_runs
from train.cli import main

pytestmark = pytest.mark.heavy


def test_llm_trains_resumes_exactly_and_exports(shards, trained_straight_and_resumed):
    shards_dir = shards
    resumed = trained_straight_and_resumed(main, [
        "llm", "--config", "debug", "--data", str(shards), "--workers", "2",
        "--set", "mixture.weights={text_to_video = 1.0, video_to_audio = 1.0, future_prediction = 1.0}"])
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4
    load_checkpoint(resumed / "model")  # checks the weights against the recorded fingerprint
    assert read_metadata(resumed / "model")["fingerprint"] == summary["fingerprint"]
    assert (resumed / "model" / "words.json").exists()

    (run,) = search_runs(f"sqlite:///{resumed / 'mlflow.db'}", "videopoet")
    metrics = run.data.metrics
    assert {"loss", "lr", "tokens_per_s", "mfu", "padding", "val_loss"} <= set(metrics)
    assert any(k.startswith("loss/") for k in metrics) and any(k.startswith("val_loss/") for k in metrics)
    assert 0 < metrics["mfu"] < 1
    assert metrics["system/node0/cpu_utilization_percentage"] >= 0  # both workers' node, sampled by one of them

    # Lineage: the shards it trained on (by fingerprint) and the tokenizers that wrote them, as dataset inputs.
    uri = f"sqlite:///{resumed / 'mlflow.db'}"
    found = MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    inputs = {(d.tags[0].value, d.dataset.digest) for d in found}
    shards = open_shards(str(shards_dir))
    assert {("train", shards.fingerprint), ("val", shards.fingerprint)} <= inputs
    assert {(f"{role}_tokenizer", t["fingerprint"]) for role, t in shards.meta.tokenizers.items() if t} <= inputs
    assert run.data.tags["videopoet.model_fingerprint"] == summary["fingerprint"]
    experiment = MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def first_losses(out):
    uri = f"sqlite:///{out / 'mlflow.db'}"
    (run,) = search_runs(uri, "videopoet")
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_adaptation_starts_from_the_pretrained_export(shards, tmp_path):
    t2v = ["--set", "mixture.weights={text_to_video = 1.0}", "--set", "train.log_every=1", "--set", "train.lr=3e-3",
           "--set", "train.warmup_steps=1", "--set", "train.eval_every=1000"]
    common = ["llm", "--config", "debug", "--data", str(shards), "--workers", "1", *t2v]
    assert main([*common, "--out", str(tmp_path / "base"), "--steps", "40"]) == 0
    base = first_losses(tmp_path / "base")
    assert base[-1] < base[0] - 1.0  # it learnt something worth starting from

    assert main([*common, "--out", str(tmp_path / "adapted"), "--steps", "2", "--init",
                 str(tmp_path / "base" / "model")]) == 0
    adapted = first_losses(tmp_path / "adapted")
    assert adapted[0] < base[-1] + 0.5 and adapted[0] < base[0] - 1.0  # base[0]: the same model and batch, fresh
    assert read_metadata(tmp_path / "adapted" / "model")["extra"]["init_fingerprint"] == \
        read_metadata(tmp_path / "base" / "model")["fingerprint"]

    # A different architecture, or a non-LLM export, is named and refused before any training.
    assert main([*common, "--out", str(tmp_path / "wide"), "--steps", "2", "--set", "model.width=64",
                 "--init", str(tmp_path / "base" / "model")]) == 2


def run_app(args, env):
    """The app in its own process (and its own embedded Ray), as `videopoet` runs; its exit code and output."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "llm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=600)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes left in the session
    return proc.returncode, output


def test_a_run_folder_on_object_storage(shards, tmp_path, s3_env, s3, capsys):
    out = "s3://bucket/runs/llm"
    common = ["--config", "debug", "--data", str(shards), "--out", out, "--workers", "1",
              "--set", "mixture.weights={text_to_video = 1.0}", "--set", "train.checkpoint_every=2"]
    assert main(["llm", *common, "--steps", "2"]) == 2  # refused before Ray starts: no local folder for mlflow.db
    assert "set tracking.uri to a tracking server" in capsys.readouterr().err
    tracked = [*common, "--set", f"tracking.uri='sqlite:///{tmp_path / 'mlflow.db'}'"]
    code, output = run_app([*tracked, "--steps", "2"], s3_env)
    assert code == 0, output[-3000:]
    code, output = run_app([*tracked, "--steps", "4"], s3_env)  # resumes from the checkpoint in the bucket
    assert code == 0, output[-3000:]

    s3 = pa_fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL_S3"], access_key="testing",
                            secret_key="testing", region="us-east-1")
    summary = json.loads(s3.open_input_stream("bucket/runs/llm/summary.json").read())
    assert summary["steps"] == 4 and summary["model"] == f"{out}/model"
    names = {i.base_name for i in s3.get_file_info(pa_fs.FileSelector("bucket/runs/llm/model"))}
    assert {"model.safetensors", "config.json", "words.json"} <= names
    assert {i.base_name for i in s3.get_file_info(pa_fs.FileSelector("bucket/runs/llm/ray/llm"))}  # checkpoints
    (run,) = search_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "videopoet")  # one run across the two commands
    assert run.data.metrics["loss"] > 0
