"""The README's main job end to end, on a tiny budget: every stage runs for real (Ray Data, Ray Train, DeepSpeed,
MLflow, ffmpeg) with a few steps each."""

import fnmatch
import hashlib
import json

import pyarrow.fs as pa_fs
import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import local_export, read_metadata
from pipeline.config import apply_overrides, from_dict, to_dict
from pipeline.media import MediaConfig, decode
from pipeline.shards import open_shards
from pipeline.synth import attribute_key, held_out_combinations
from pipeline.tracking import search_runs
from apps.cli import demo as main
from apps.demo import DemoConfig
from servers import run_app

STAGES = {"synth", "check", "video_tokenizer", "audio_tokenizer", "tokenize", "llm", "superres", "generate", "eval"}
TINY = [a for s in ["clips=12", "prompts=2", "audio_samples=1", "image_samples=1", "sr_samples=1",
                    "video_tokenizer.train.steps=2", "audio_tokenizer.train.steps=2", "llm.train.steps=2",
                    "llm.train.eval_every=2", "superres.train.steps=2", "superres.train.eval_every=2",
                    "synth.val_fraction=0.25", "eval_samples=2"] for a in ("--set", s)]


@pytest.mark.heavy
def test_demo_end_to_end_into_a_bucket(s3_env, s3, tracking_server, tmp_path, monkeypatch):
    """`videopoet demo` on a tiny budget, as on a cluster whose nodes share no disk: its run folder in a bucket and
    MLflow on a server. Every stage reads and writes the bucket, and nothing lands locally but caches and temporaries.
    One run covers a local OUT as well: the demo reaches its folder only through `RunFolder` and
    `pipeline.storage.staged_folder`, which take a path or a URI (their local side, and each app on a local folder with
    the embedded MLflow store, are tested in their own files). It runs in its own process (and Ray), as a user runs
    it, so that its Ray workers see the bucket's endpoint."""
    uri, _ = tracking_server
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a URI taken for a path would become a folder `s3:` here
    out = "s3://bucket/runs/demo"
    code, output = run_app(["demo", "--out", out, *TINY, "--set", f"tracking.uri='{uri}'"], s3_env)
    assert code == 0, output[-5000:]
    assert "adherence" in output and "[llm] step 2/2" in output
    summary = json.loads(read_text(f"{out}/summary.json"))
    assert summary["data_oracle"]["video"] >= 0.99 and summary["data_oracle"]["audio"] >= 0.99
    assert set(summary["adherence"]) == {"text_to_video", "text_to_video_held_out", "text_to_video_2x",
                                         "image_to_video", "image_to_video_held_out", "video_to_audio"}
    assert summary["chance"]["all_attributes"] == pytest.approx(1 / 48)
    assert summary["tokenize"]["clips"] == 9 and summary["llm"] and summary["superres"]
    assert summary["eval"] == f"{out}/eval/metrics.json"
    # 3 of the first 12 clips have held-out combinations: no stage trains on them
    trained = [json.loads(line) for line in read_text(f"{out}/corpus/train.jsonl").splitlines()]
    held = held_out_combinations(DemoConfig().held_out)
    assert len(trained) == 9 and not any(attribute_key(r) in held for r in trained)

    keys = {info.path.removeprefix("bucket/runs/demo/")
            for info in s3.get_file_info(pa_fs.FileSelector("bucket/runs/demo", recursive=True))
            if info.type == pa_fs.FileType.File}
    for pattern in ("corpus/videos/*.mp4", "corpus/train.jsonl", "video_tokenizer/tokenizer/config.json",
                    "audio_tokenizer/tokenizer/model.safetensors", "shards/*.parquet", "llm/model/config.json",
                    "superres/model/config.json", "samples/t2v_*.mp4", "samples/i2v_*.mp4", "samples/sr_*.mp4",
                    "samples/v2a_*.mp4", "eval/metrics.json", "eval/samples.parquet", "demo_config.json"):
        assert fnmatch.filter(keys, pattern), pattern
    assert not any(".tmp-" in key for key in keys)
    (side_by_side,) = fnmatch.filter(keys, "samples/sr_*.mp4")
    (tmp_path / "sr.mp4").write_bytes(s3.open_input_stream(f"bucket/runs/demo/{side_by_side}").read())
    frames = decode(str(tmp_path / "sr.mp4"), MediaConfig(height=64, width=128, clip_frames=9)).clips[0].frames
    assert frames.shape == (9, 64, 128, 3)  # 32x32 enlarged 2x, next to the 2x stage's 64x64
    assert not list((tmp_path / "cwd").iterdir())
    assert sorted(tmp_path.rglob("*.db")) == [tmp_path / "server" / "mlflow.db"]

    runs = {r.info.run_name: r for r in search_runs(uri, "videopoet")}
    assert STAGES | {"demo"} <= set(runs) and all(r.info.status == "FINISHED" for r in runs.values())
    parent = runs["demo"].info.run_id
    assert all(runs[s].data.tags["mlflow.parentRunId"] == parent for s in STAGES)
    monkeypatch.setattr("pipeline.checkpoint.EXPORT_CACHE", tmp_path / "cache")
    check_lineage(uri, runs, out)


def read_text(location):
    fs, path = pa_fs.FileSystem.from_uri(location) if "://" in location else (pa_fs.LocalFileSystem(), location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def check_lineage(uri, runs, out):
    """The chain manifest -> tokenizers -> shards -> LLM -> eval, read back from MLflow's dataset inputs and tags and
    checked against the files each stage wrote."""
    client = MlflowClient(uri)

    def inputs(stage):
        return {d.tags[0].value: d.dataset for d in client.get_run(runs[stage].info.run_id).inputs.dataset_inputs}

    ids = sorted(json.loads(line)["id"] for line in read_text(f"{out}/corpus/train.jsonl").splitlines())
    manifest_digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    shards = open_shards(f"{out}/shards")
    llm = read_metadata(local_export(f"{out}/llm/model"))["fingerprint"]

    tokenize = inputs("tokenize")
    assert tokenize["source"].digest == inputs("video_tokenizer")["train"].digest == manifest_digest
    assert tokenize["source"].name == "manifest-train" and json.loads(tokenize["source"].profile)["num_rows"] == 9
    for role in ("video", "audio"):
        exported = runs[f"{role}_tokenizer"].data.tags["videopoet.model_fingerprint"]
        assert tokenize[f"{role}_tokenizer"].digest == exported == shards.meta.tokenizers[role]["fingerprint"]
    assert tokenize["output"].digest == shards.fingerprint == runs["tokenize"].data.tags["videopoet.shards_fingerprint"]
    assert json.loads(tokenize["output"].profile)["num_rows"] == shards.clips

    trained = inputs("llm")
    assert trained["train"].digest == trained["val"].digest == shards.fingerprint
    assert runs["llm"].data.tags["videopoet.model_fingerprint"] == llm

    evaluated = inputs("eval")
    assert evaluated["model"].digest == llm
    assert evaluated["prompts"].name == "prompts-synthetic" and json.loads(evaluated["prompts"].profile)["num_rows"] > 0
    val_ids = sorted(json.loads(line)["id"] for line in read_text(f"{out}/corpus/val.jsonl").splitlines())
    assert evaluated["reference"].digest == hashlib.sha256("\n".join(val_ids).encode()).hexdigest()[:16]


def test_flavor_defaults_survive_overrides(tmp_path):
    base = DemoConfig()
    assert base.llm.train.steps > 2 and base.video_tokenizer.media.width == 32 and base.tokenize.hr
    cfg = from_dict(DemoConfig, apply_overrides(to_dict(base), ["llm.train.steps=2"]))
    assert cfg.llm.train.steps == 2 and cfg.llm.train.lr == base.llm.train.lr and cfg.llm.model == base.llm.model


def test_demo_rejects_unknown_keys_and_empty_sample_counts(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--set", "synth.widht=3"]) == 2
    assert "synth.widht" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--set", "sr_samples=0"]) == 2
    assert "sr_samples must be >= 1" in capsys.readouterr().err
    assert main(["--out", "s3://bucket/runs/demo"]) == 2  # refused before the bucket is touched
    assert "set tracking.uri to a tracking server" in capsys.readouterr().err


def test_demo_refuses_stages_that_disagree_on_the_clip(tmp_path, capsys):
    """Refused before anything runs, naming the field: the 2x stage's grid is otherwise checked after the LLM."""
    paper_clip = ["superres.model.grid=[5,16,16]", "superres.model.windows=[[1,16,4],[1,4,16],[5,4,4]]"]
    cases = {
        "superres.model.grid [5, 16, 16] up-samples (5, 8, 8) codes, but the video tokenizer makes (3, 8, 8) of the "
        "demo's clips: set superres.model.grid = [3, 16, 16]": paper_clip,
        "audio_tokenizer.media: clips of 17 frames at 8 fps, but tokenize.media makes 9": [
            "audio_tokenizer.media.clip_frames=17"],
        "synth: 24 frames at 24 fps are shorter than one clip (9 frames at 8 fps)": ["synth.frames=24"],
    }
    for message, overrides in cases.items():
        assert main(["--out", str(tmp_path / "out"), *(a for o in overrides for a in ("--set", o))]) == 2
        assert message in capsys.readouterr().err
    clip17 = [f"{s}.media.{k}=17" for s in ("video_tokenizer", "audio_tokenizer", "tokenize")
              for k in ("clip_frames", "stride_frames")]
    cfg = from_dict(DemoConfig, apply_overrides(to_dict(DemoConfig()), [*clip17, "synth.frames=51", *paper_clip]))
    assert cfg.superres.model.lr_grid == (5, 8, 8)  # the paper's 17-frame clips, every stage told
    assert not (tmp_path / "out").exists()
