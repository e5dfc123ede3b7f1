"""`videopoet train llm` end to end: tokenize job shards -> Ray Train + DeepSpeed ZeRO-3 (2 CPU workers) -> export,
with an exact resume and MLflow metrics per task."""

import json

import pyarrow.fs as pa_fs
import pytest
import torch
from safetensors.torch import load_file
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import load_checkpoint, read_metadata
from pipeline.shards import open_shards
from pipeline.tracking import search_runs
from servers import run_app
from train.cli import main

pytestmark = pytest.mark.heavy


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


def test_llm_trains_resumes_exactly_from_object_storage_and_exports(shards, tmp_path, s3_env, s3, capsys):
    """Four steps straight into a local folder; the same run into a bucket as two commands (2 steps, then resumed to
    4 from the checkpoint in the bucket, each in its own process as `videopoet` runs): the same weights."""
    common = ["--config", "debug", "--data", str(shards), "--workers", "2", "--set", "train.checkpoint_every=2",
              "--set", "mixture.weights={text_to_video = 1.0, video_to_audio = 1.0, future_prediction = 1.0}"]
    straight = tmp_path / "straight"
    assert main(["llm", *common, "--out", str(straight), "--steps", "4"]) == 0

    out = "s3://bucket/runs/llm"
    assert main(["llm", *common, "--out", out, "--steps", "2"]) == 2  # refused before Ray starts: no mlflow.db folder
    assert "set tracking.uri to a tracking server" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = [*common, "--out", out, "--set", f"tracking.uri='{uri}'"]
    for steps in (2, 4):
        code, output = run_app(["train", "llm", *tracked, "--steps", str(steps)], s3_env, timeout=600)
        assert code == 0, output[-3000:]
        said = [line for line in output.splitlines() if "[llm] " in line]  # from rank 0's worker, through Ray
        assert said and len(said) == len(set(said)), said  # each once
    assert "[llm] resumed at step 2" in output

    s3 = pa_fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL_S3"], access_key="testing",
                            secret_key="testing", region="us-east-1")
    summary = json.loads(s3.open_input_stream("bucket/runs/llm/summary.json").read())
    assert summary["steps"] == 4 and summary["model"] == f"{out}/model"
    names = {i.base_name for i in s3.get_file_info(pa_fs.FileSelector("bucket/runs/llm/model"))}
    assert {"model.safetensors", "config.json", "words.json"} <= names
    assert {i.base_name for i in s3.get_file_info(pa_fs.FileSelector("bucket/runs/llm/ray/llm"))}  # checkpoints
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in names:
        (resumed / name).write_bytes(s3.open_input_stream(f"bucket/runs/llm/model/{name}").read())
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    load_checkpoint(resumed)  # checks the weights against the recorded fingerprint
    assert read_metadata(resumed)["fingerprint"] == summary["fingerprint"]

    (run,) = search_runs(uri, "videopoet")  # one run across the two commands
    metrics = run.data.metrics
    assert {"loss", "lr", "tokens_per_s", "mfu", "padding", "val_loss"} <= set(metrics)
    assert any(k.startswith("loss/") for k in metrics) and any(k.startswith("val_loss/") for k in metrics)
    assert 0 < metrics["mfu"] < 1
    assert metrics["system/node0/cpu_utilization_percentage"] >= 0  # both workers' node, sampled by one of them

    # Lineage: the shards it trained on (by fingerprint) and the tokenizers that wrote them, as dataset inputs.
    found = MlflowClient(uri).get_run(run.info.run_id).inputs.dataset_inputs
    inputs = {(d.tags[0].value, d.dataset.digest) for d in found}
    tokens = open_shards(str(shards))
    assert {("train", tokens.fingerprint), ("val", tokens.fingerprint)} <= inputs
    assert {(f"{role}_tokenizer", t["fingerprint"]) for role, t in tokens.meta.tokenizers.items() if t} <= inputs
    assert run.data.tags["videopoet.model_fingerprint"] == summary["fingerprint"]
    experiment = MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
