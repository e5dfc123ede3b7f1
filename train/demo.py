"""`videopoet demo --out DIR`: the end-to-end job on embedded defaults.

Stages, each a child MLflow run under one parent run:
  synth   write the synthetic audio-visual world as real MP4 files and a manifest
  decode  decode every file into clips with the media module
  check   read the decoded clips back with the world's oracle and score them against the ground truth
Figures go to DIR/summary.json and a printed table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, load_config, to_dict
from pipeline.manifest import read_manifest
from pipeline.media import MediaConfig, decode
from pipeline.oracle import ATTRIBUTES, read_attributes, score_av
from pipeline.synth import SynthConfig, write_corpus
from pipeline.tracking import TrackingConfig, start_run


@dataclass(frozen=True)
class DemoConfig:
    clips: int = 48  # each of the 48 attribute combinations once
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)
    media: MediaConfig = field(default_factory=lambda: MediaConfig(height=64, width=64))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


class Stages:
    """Runs stages as child runs of one parent run and keeps their wall times."""

    def __init__(self, parent):
        self.parent = parent
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, params=None):
        print(f"[demo] {name} ...", flush=True)
        began = time.perf_counter()
        with self.parent.child(name, params) as child:
            result = fn(child)
            self.seconds[name] = time.perf_counter() - began
            child.log_metrics({"wall_seconds": self.seconds[name]})
        print(f"[demo] {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result


def synth_stage(cfg: DemoConfig, out: Path):
    def run(tracker):
        rows = write_corpus(out / "corpus", cfg.synth, cfg.clips, cfg.seed)
        tracker.log_metrics({"clips": len(rows)})
        tracker.log_artifact(out / "corpus" / "manifest.jsonl")
        return out / "corpus" / "manifest.jsonl"
    return run


def decode_stage(cfg: DemoConfig, manifest: Path):
    def run(tracker):
        table = read_manifest(manifest)
        rows = table.to_pylist()
        clips, failures = [], []
        for row in rows:
            result = decode(row["path"], cfg.media)
            clips += [(row, clip) for clip in result.clips]
            if result.error is not None:
                failures.append({"source": row["source"], "kind": result.error.kind, "message": str(result.error)})
        tracker.log_metrics({"files": len(rows), "clips": len(clips), "failed_files": len(failures)})
        if failures:
            tracker.log_dict(failures, "failures.json")
        return clips, failures
    return run


def check_stage(cfg: DemoConfig, clips):
    def run(tracker):
        reads = [read_attributes(clip.frames, clip.audio, cfg.media.sample_rate) for _, clip in clips]
        expected = [{a: row[a] for a in ATTRIBUTES} for row, _ in clips]
        scores = score_av(reads, expected)
        tracker.log_metrics({f"oracle.{k}": v for k, v in scores.items()})
        return scores
    return run


def run_demo(cfg: DemoConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    began = time.perf_counter()
    with start_run(cfg.tracking, out, "demo", params=cfg) as parent:
        stages = Stages(parent)
        manifest = stages.run("synth", synth_stage(cfg, out), cfg.synth)
        clips, failures = stages.run("decode", decode_stage(cfg, manifest), cfg.media)
        scores = stages.run("check", check_stage(cfg, clips))
        summary = {
            "clips": len(clips),
            "failed_files": len(failures),
            "oracle": scores,
            "stage_seconds": stages.seconds,
            "total_seconds": time.perf_counter() - began,
            "mlflow": {"tracking_uri": parent.uri, "run_id": parent.run_id},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        parent.log_artifact(out / "summary.json")
        parent.log_metrics({"total_seconds": summary["total_seconds"]})
    print_summary(summary, out)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    scores = summary["oracle"]
    print(f"\nvideopoet demo: {summary['clips']} clips decoded, {summary['failed_files']} files failed")
    print(f"{'attribute':<10} {'video':>7} {'audio':>7} {'agree':>7}")
    for name in (*ATTRIBUTES, "all"):
        print(f"{name:<10} {scores[f'video.{name}']:>7.1%} {scores[f'audio.{name}']:>7.1%} "
              f"{scores[f'agreement.{name}']:>7.1%}")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary["stage_seconds"].items())
    print(f"stages: {stages}; total {summary['total_seconds']:.1f} s")
    print(f"summary: {out / 'summary.json'}")
    if summary["mlflow"]["run_id"]:
        print(f"MLflow:  mlflow ui --backend-store-uri {summary['mlflow']['tracking_uri']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run folder (corpus, summary.json, mlflow.db)")
    parser.add_argument("--config", default=None, help="a TOML file of DemoConfig sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set clips=96 or --set media.width=128")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"videopoet demo: {e}", file=sys.stderr)
        return 2
    run_demo(cfg, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
