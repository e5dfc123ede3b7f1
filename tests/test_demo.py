import json

from pipeline.tracking import search_runs
from train.demo import main


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--set", "clips=12", "--set", "seed=3"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["clips"] == 12 and summary["failed_files"] == 0
    assert summary["oracle"]["video.all"] >= 0.99 and summary["oracle"]["audio.all"] >= 0.99
    assert set(summary["stage_seconds"]) == {"synth", "decode", "check"}
    config = json.loads((tmp_path / "demo_config.json").read_text())
    assert config["clips"] == 12 and config["media"]["width"] == 64
    runs = {r.info.run_name: r for r in search_runs(summary["mlflow"]["tracking_uri"], "videopoet")}
    assert set(runs) == {"demo", "synth", "decode", "check"}
    parent = runs["demo"].info.run_id
    assert all(runs[s].data.tags["mlflow.parentRunId"] == parent for s in ("synth", "decode", "check"))
    assert runs["demo"].data.params["media.width"] == "64"
    assert runs["check"].data.metrics["oracle.video.all"] >= 0.99
    assert "video" in capsys.readouterr().out


def test_demo_rejects_unknown_keys(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--set", "synth.widht=3"]) == 2
    assert "synth.widht" in capsys.readouterr().err
