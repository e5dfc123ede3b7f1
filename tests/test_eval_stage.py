"""`videopoet eval` on a random-init debug export: prompt sets, the oracle classifier, and the Ray stage end to end
(generation actors, real clips through the media module, I3D / CLIP / oracle feature actors, Parquet rows, metrics
checked against independent computations, MLflow runs and artifacts)."""

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from eval.fvd import frechet_distance
from eval.oracle_classifier import UNREADABLE, OracleAttributeClassifier
from eval.prompts import load_prompts, render_condition, sample_rows
from eval.cli import main
from eval.stage import EvalConfig
from pipeline.config import load_config
from pipeline.media import MediaConfig
from pipeline.oracle import read_attributes
from pipeline.synth import SynthConfig, attribute_schedule, caption, plan, render_video, write_corpus
from pipeline.tracking import RUN_FILE, TrackingConfig, search_runs, start_run

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
MEDIA = MediaConfig(height=32, width=32)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def export(llm_export):
    return llm_export([caption(a) for a in attribute_schedule(0, 48)], MEDIA)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIP as an open_clip local-dir model, so Ray's worker processes can load it by path."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "tiny.json")
    torch.manual_seed(0)
    weights = open_clip.create_model("tiny").state_dict()
    (folder / "tiny.json").unlink()
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return f"local-dir:{folder}"


# ---------------------------------------------------------------------------------------------------- prompts

def test_prompt_sets_and_sample_rows(tmp_path):
    synthetic = load_prompts("synthetic", 1, ("text_to_video", "video_to_audio"))
    assert len(synthetic.prompts) == 96 and synthetic.repeats == 1
    first, second = synthetic.prompts[:2]
    assert first.text == caption(first.attributes) and first.task == "text_to_video"
    assert second.task == "video_to_audio" and second.text == "" and second.attributes == first.attributes
    assert len({tuple(p.attributes.values()) for p in synthetic.prompts}) == 48

    fairness = load_prompts("fairness", 1, ("text_to_video",))
    assert len(fairness.prompts) == 306 and fairness.repeats == 8 and len(fairness.fairness) == 306
    rows = sample_rows(fairness, 20, seed=5, media_samples=3)
    assert len(rows) == 20 and [r["prompt_id"] for r in rows[7:10]] == [0, 1, 1]
    assert [r["seed"] for r in rows[:2]] == [5, 6] and [r["keep_media"] for r in rows[2:4]] == [True, False]

    lines = tmp_path / "prompts.txt"
    lines.write_text("a red circle moving left\n\n  a cat on a mat  \n")
    assert [(p.task, p.text) for p in load_prompts(str(lines), 2, ("text_to_video",)).prompts] == [
        ("text_to_video", "a red circle moving left"), ("text_to_video", "a cat on a mat")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"task": "image_to_video", "prompt": "x", "video": "clip.mp4"}\n'
                     '{"task": "audio_to_video", "attributes": {"shape": "square", "color": "red", "motion": "up"}}\n')
    loaded = load_prompts(str(jsonl), 1, ("text_to_video",)).prompts
    assert loaded[0].video == str(tmp_path / "clip.mp4") and loaded[1].attributes["shape"] == "square"
    with pytest.raises(FileNotFoundError, match="built-in sets"):
        load_prompts(str(tmp_path / "missing.txt"), 1, ("text_to_video",))


@pytest.mark.parametrize("line, message", [
    ('{"task": "text_to_sound", "prompt": "x"}', "task 'text_to_sound' is not one of"),
    ('{"task": "text_to_video"}', "text_to_video needs a non-empty prompt"),
    ('{"task": "video_to_audio", "prompt": "x"}', "give a \"video\" file or all three \"attributes\""),
    ('{"task": "text_to_video", "prompt": "x", "attributes": {"shape": "star"}}', "attribute shape='star'"),
    ('{"task": "text_to_video", "text": "x"}', "expected an object with \"task\""),
    ("not json", "not JSON"),
])
def test_bad_prompts_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "text_to_video", "prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{re.escape(message)}"):
        load_prompts(str(path), 1, ("text_to_video",))


def test_rendered_conditions_carry_their_attributes():
    attributes = {"shape": "triangle", "color": "blue", "motion": "down"}
    frames, audio = render_condition(attributes, MediaConfig(height=64, width=64), seed=3)
    assert frames.shape == (17, 64, 64, 3) and audio.shape == (MediaConfig().clip_samples,)
    reads = read_attributes(frames, audio, 16000)
    assert reads["video"] == attributes and reads["audio"] == attributes


def test_oracle_classifier_labels_reads_and_unreadable_clips():
    classifier = OracleAttributeClassifier()
    specs = plan(SynthConfig(width=64, height=64, frames=17, fps=8), seed=0, n=4)
    clips = [render_video(spec, SynthConfig(width=64, height=64, frames=17, fps=8)) for spec in specs]
    blank = np.full((17, 64, 64, 3), 40, np.uint8)
    labels = classifier([*clips, blank, clips[0][:1]])
    for name, classes in classifier.attributes.items():
        assert classes[-1] == UNREADABLE
        assert [classes[i] for i in labels[name][:4]] == [getattr(s, name) for s in specs]
        assert classes[labels[name][4]] == UNREADABLE
    assert classifier.attributes["shape"][labels["shape"][5]] == specs[0].shape  # an image: shape and color ...
    assert classifier.attributes["motion"][labels["motion"][5]] == UNREADABLE  # ... but no motion
    assert classifier.references()["color"].tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]
    with pytest.raises(ValueError, match="shape 'star' is none of"):
        classifier.labels([{"shape": "star", "color": None, "motion": None}])


def test_config_flavors_and_checks():
    for flavor in ("debug", "demo", "paper"):
        cfg = load_config(EvalConfig, flavor, kind="eval")
        assert not cfg.i3d.weights and not cfg.clip.weights  # nothing can be downloaded: random-init by default
    assert load_config(EvalConfig, "paper", kind="eval").i3d.num_frames == 16
    with pytest.raises(ValueError, match="synthetic_tasks"):
        EvalConfig(synthetic_tasks=("text_to_sound",))


def test_cli_errors_name_the_input(tmp_path, capsys):
    with start_run(TrackingConfig(), tmp_path / "llm", "llm") as parent:
        pass
    (tmp_path / "llm" / RUN_FILE).write_text(json.dumps({"uri": parent.uri, "run_id": parent.run_id}))
    args = ["--prompts", "synthetic", "--out", str(tmp_path / "eval"), "--config", "debug"]
    # The parent is found in the store the folder's mlflow_run.json records; the folder itself is no LLM export.
    assert main(["--checkpoint", str(tmp_path / "llm"), "--parent-run", parent.run_id, *args]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "llm"), "--parent-run", "0123456789abcdef", *args]) == 2
    assert "--parent-run 0123456789abcdef: no such run" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "elsewhere"), "--parent-run", parent.run_id, *args]) == 2
    assert "give --tracking-uri" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "llm"), *args, "--set", "bootstrap=0"]) == 2
    assert "EvalConfig.bootstrap must be >= 1" in capsys.readouterr().err
    bucket = ["--prompts", "synthetic", "--out", "s3://bucket/eval", "--config", "debug"]
    assert main(["--checkpoint", str(tmp_path / "llm"), *bucket]) == 2  # refused before the bucket is reached
    assert "--out s3://bucket/eval is an object-store URI" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- the stage

@pytest.mark.heavy
def test_stage_end_to_end(ray_local, export, tiny_clip, tmp_path, capsys):
    corpus = tmp_path / "real"
    write_corpus(corpus, SynthConfig(frames=17, fps=8, width=64, height=48), n=3, seed=1)
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(export / "run"), "--prompts", "synthetic", "--samples", "4",
                 "--real", str(corpus / "manifest.jsonl"), "--out", str(out), "--config", "debug",
                 "--set", f"clip.model={tiny_clip}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["random_init"] == {"i3d": True, "clip": False}

    table = pq.read_table(out / "samples.parquet")
    rows = {r["id"]: r for r in table.to_pylist()}
    generated = [rows[f"gen-{i:06d}"] for i in range(4)]
    assert [r["task"] for r in generated] == ["text_to_video", "video_to_audio", "audio_to_video", "text_to_video"]
    assert all(r["ok"] for r in rows.values()) and len(rows) == 7
    assert [r["seed"] for r in generated] == [0, 1, 2, 3]
    assert generated[0]["prompt"] == caption({a: generated[0][f"expected_{a}"] for a in ("shape", "color", "motion")})
    assert generated[1]["prompt"] is None and generated[1]["i3d_features"] is None  # v2a: no generated video
    assert generated[1]["oracle_audio_shape"] is not None  # the oracle always hears one of the pitches
    for r in generated:
        assert r["oracle_match"] in (True, False) and r["expected_shape"]
    videos = [r for r in rows.values() if r["i3d_features"] is not None]
    assert len(videos) == 6 and all(len(r["i3d_features"]) == 400 for r in videos)
    assert -1 <= generated[0]["clip_similarity"] <= 1 and generated[0]["clip_score"] >= 0
    assert generated[2]["clip_similarity"] is None  # audio-to-video has no text here

    metrics = json.loads((out / "metrics.json").read_text())
    features = {s: np.array([r["i3d_features"] for r in videos if r["source"] == s]) for s in ("generated", "real")}
    expected = frechet_distance(features["generated"], features["real"], covariance="unbiased")
    assert metrics["fvd"]["value"] == pytest.approx(expected, rel=1e-9)
    assert metrics["fvd"]["generated"] == 3 and metrics["fvd"]["real"] == 3
    assert "RANDOM-INIT" in metrics["fvd"]["protocol"] and "unbiased covariance" in metrics["fvd"]["protocol"]
    assert "RANDOM-INIT" not in metrics["clipsim"]["protocol"]
    scored = [generated[0]["clip_similarity"], generated[3]["clip_similarity"]]
    assert metrics["clipsim"]["generated"]["clip_similarity"] == pytest.approx(np.mean(scored))
    t2v = [generated[0], generated[3]]
    adherence = metrics["oracle"]["adherence"]
    assert adherence["text_to_video"]["all"] == np.mean([r["oracle_match"] for r in t2v])
    assert adherence["text_to_video"]["samples"] == 2 and metrics["oracle"]["chance"]["all"] == pytest.approx(1 / 48)
    assert set(metrics["oracle"]["av_agreement"]) == {"video_to_audio", "audio_to_video"}
    shape = metrics["fairness"]["attributes"]["oracle/shape"]
    assert sum(shape["counts"]) == 3 and shape["classes"][-1] == UNREADABLE
    assert sum(metrics["fairness"]["attributes"]["clip/age"]["counts"]) == 3
    assert (out / "plots" / "attributes.png").stat().st_size > 0 and (out / "plots" / "samples.png").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.mp4")) == ["gen-000000_text_to_video.mp4",
                                                                      "gen-000001_video_to_audio.mp4"]

    runs = search_runs(f"sqlite:///{out / 'mlflow.db'}", "videopoet")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "eval"
    logged = runs[0].data
    assert logged.metrics["fvd"] == pytest.approx(expected, rel=1e-9)
    assert logged.metrics["adherence/text_to_video/all_chance"] == pytest.approx(1 / 48)
    assert logged.tags["eval.i3d_weights"] == "random-init" and logged.params["i3d.num_frames"] == "9"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"metrics.json", "samples.parquet", "plots", "samples"} <= artifacts


@pytest.mark.heavy
def test_stage_on_real_media_nests_under_a_parent_run(ray_local, export, tiny_clip, tmp_path):
    """Conditions and reference clips from the real corpus; unreadable files become error rows, not failures."""
    if not (REAL / "chaplin.mp4").exists():
        pytest.skip(f"real corpus {REAL} is missing")
    tracking = tmp_path / "train"
    with start_run(TrackingConfig(), tracking, "llm") as parent:
        pass
    uri = f"sqlite:///{tracking / 'mlflow.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in [
        {"task": "image_to_video", "prompt": "a man in a bowler hat", "video": str(REAL / "chaplin.mp4")},
        {"task": "video_to_audio", "video": str(REAL / "result.webm")}]) + "\n")
    manifest = tmp_path / "real.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(REAL / name)}) + "\n"
                                for name in ("example.mp4", "result.webm")))
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(export / "run"), "--prompts", str(prompts), "--real", str(manifest), "--out",
                 str(out), "--config", "debug", "--set", f"clip.model={tiny_clip}", "--parent-run", parent.run_id,
                 "--tracking-uri", uri]) == 0

    rows = {r["id"]: r for r in pq.read_table(out / "samples.parquet").to_pylist()}
    assert rows["gen-000000"]["ok"] and len(rows["gen-000000"]["i3d_features"]) == 400
    assert not rows["gen-000001"]["ok"] and "result.webm" in rows["gen-000001"]["error"]
    real = [r for r in rows.values() if r["source"] == "real"]
    assert sorted(r["ok"] for r in real) == [False, True]  # example.mp4 (no audio) decodes; the empty file fails
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == {"generated": 1, "generated_failed": 1, "real": 1, "real_failed": 1}
    assert metrics["fvd"]["value"] is None and "covariance needs more than 1" in metrics["fvd"]["reason"]
    runs = {r.info.run_name: r for r in search_runs(uri, "videopoet")}
    assert runs["eval"].data.tags["mlflow.parentRunId"] == parent.run_id
    assert "fvd" not in runs["eval"].data.metrics and runs["eval"].data.metrics["samples/real_failed"] == 1
    assert not (out / "mlflow.db").exists()
