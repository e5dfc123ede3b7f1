"""`videopoet demo --out DIR`: the end-to-end job on embedded defaults (local Ray, local files, MLflow in DIR).

DIR may be an object-store URI (`s3://bucket/runs/demo`, every stage reading and writing there, as on a cluster
whose nodes share no disk); MLflow then needs a tracking server (`--set tracking.uri=http://...`). Media are
synthesized and samples written in local temporary folders, then uploaded.

Stages, each a child MLflow run under one parent run:
  synth            the synthetic audio-visual world as real MP4 files and a manifest; the clips of `held_out`
                   attribute combinations are kept out of every training stage
  check            decode every file with the media module; the world's oracle reads the clips back
  video_tokenizer  train MAGVIT-v2 (Ray Train)
  audio_tokenizer  train SoundStream (Ray Train)
  tokenize         the Ray Data tokenize job -> Parquet token shards
  llm              train the LLM on the shards (Ray Train + DeepSpeed ZeRO-3)
  superres         train one 2x super-resolution stage on the shards' 2x tokens (Ray Train + DeepSpeed ZeRO-3)
  generate         text-to-video (of trained and of held-out combinations), image-to-video (of training and of
                   held-out clips) and video-to-audio (of held-out clips) samples, scored by the oracle against their
                   prompts; the first text-to-video samples also through the 2x stage, written low- and
                   high-resolution side by side
  eval             the Ray evaluation stage on the synthetic prompts: FVD (against the held-out clips) and CLIPSIM
                   (random-init I3D and CLIP, labelled so), prompt adherence and audio-visual agreement by the
                   oracle, logged to MLflow
Figures go to DIR/summary.json (adherence per task next to its chance level, wall time per stage) and a table.
Every section defaults to its app's `demo` flavor; `--set llm.train.steps=100` overrides on top of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from eval.stage import EvalConfig, run_eval
from pipeline.config import ConfigError, apply_overrides, from_dict, load_config, to_dict
from pipeline.generation import Condition, SamplingConfig, VideoPoet, model_dir
from pipeline.magvit import MagvitModel
from pipeline.manifest import read_manifest
from pipeline.media import decode, write_video
from pipeline.oracle import ATTRIBUTES, read_attributes, read_audio_attributes, read_video_attributes, score, score_av
from pipeline.storage import Busy, check_folder, redact_values, save_text, staged_folder
from pipeline.synth import COLORS, MOTIONS, SHAPES, SynthConfig, attribute_key, caption, held_out_combinations, \
    write_corpus
from pipeline.tracking import TrackingConfig, check_store, start_run, ui_url
from tokenize_jobs.job import TokenizeConfig, TokenizeJob, summary_metrics
from train.llm import LLMTrainConfig, refuse_vocab_overrides, train_llm
from train.mixture import check_inputs
from train.runs import SUMMARY_FILE, RunFolder, write_summary
from train.superres import SRTrainConfig, train_sr
from train.tokenizers import AudioModality, AudioTokenizerTrainConfig, VideoModality, VideoTokenizerTrainConfig, \
    train_tokenizer

CHANCE_ALL = 1 / (len(SHAPES) * len(COLORS) * len(MOTIONS))
ADHERENCE = ("text_to_video", "text_to_video_held_out", "text_to_video_2x", "image_to_video", "image_to_video_held_out",
             "video_to_audio")


def _flavor(cls, kind):
    return lambda: load_config(cls, "demo", kind=kind)


@dataclass(frozen=True)
class DemoConfig:
    clips: int = 192  # each of the 48 attribute combinations 4 times
    seed: int = 0
    prompts: int = 48  # text-to-video samples: every attribute combination the LLM trained on once (at most 48)
    # Attribute combinations no stage trains on (their clips are left out of the training manifest); text-to-video is
    # also asked for them: adherence there is generalization, on the others recall of training clips.
    held_out: int = 8
    audio_samples: int = 16  # video-to-audio samples, on held-out clips
    image_samples: int = 16  # image-to-video samples (a clip's first frame and caption), of training and held-out clips
    sr_samples: int = 8  # text-to-video samples also upsampled by the 2x stage (scored by the oracle at 2x)
    # Greedy: a few minutes of training leave the model sure of a clip's first frame but not of every later code, and
    # sampling those doubts makes objects smear (measured: adherence 65% greedy, 54% at temperature 0.3, 48% at 0.7).
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    # One 9-frame clip at 8 fps per file (1.125 s, the demo flavors' `media.clip_frames`).
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(frames=27))
    video_tokenizer: VideoTokenizerTrainConfig = field(
        default_factory=_flavor(VideoTokenizerTrainConfig, VideoModality.kinds))
    audio_tokenizer: AudioTokenizerTrainConfig = field(
        default_factory=_flavor(AudioTokenizerTrainConfig, AudioModality.kinds))
    # with the 2x tokens the super-resolution stage trains on
    tokenize: TokenizeConfig = field(
        default_factory=lambda: replace(load_config(TokenizeConfig, "demo", kind="tokenize"), hr=True))
    llm: LLMTrainConfig = field(default_factory=_flavor(LLMTrainConfig, {"": "train_llm", "model": "llm"}))
    superres: SRTrainConfig = field(default_factory=_flavor(SRTrainConfig, {"": "train_sr", "model": "superres"}))
    eval: EvalConfig = field(default_factory=_flavor(EvalConfig, "eval"))
    eval_samples: int = 16  # synthetic-world prompts the evaluation stage generates and scores
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if not 0 <= self.held_out <= 16:
            raise ValueError(f"DemoConfig.held_out must be in [0, 16] (of the 48 attribute combinations), "
                             f"got {self.held_out}")
        for name in ("prompts", "audio_samples", "image_samples", "sr_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1 (adherence is a share of samples), "
                                 f"got {getattr(self, name)}")
        # The shards the tokenize stage will write: captioned clips with sound, structure videos if asked for.
        made = {"caption", "audio"} | ({"structure"} if self.tokenize.structure else set())
        check_inputs(self.llm.mixture, made, "the demo's shards")
        if not self.tokenize.hr:
            raise ValueError("tokenize.hr = false: the demo's superres stage trains on the shards' 2x tokens")
        self._check_clips()

    def _check_clips(self):
        """The stages agree on the clip before anything trains (a mismatch would otherwise surface stages later)."""
        media = self.tokenize.media
        clip = (media.clip_frames, media.fps)
        for name in ("video_tokenizer", "audio_tokenizer"):
            other = getattr(self, name).media
            if (other.clip_frames, other.fps) != clip:
                raise ValueError(f"{name}.media: clips of {other.clip_frames} frames at {other.fps:g} fps, but "
                                 f"tokenize.media makes {media.clip_frames} at {media.fps:g} fps")
        if self.synth.seconds < media.clip_frames / media.fps:
            raise ValueError(f"synth: {self.synth.frames} frames at {self.synth.fps} fps are shorter than one clip "
                             f"({media.clip_frames} frames at {media.fps:g} fps)")
        with torch.device("meta"):
            grid = MagvitModel(self.video_tokenizer.model).latent_shape(media.clip_frames, media.height, media.width)
        sr = self.superres.model
        if sr.lr_grid != grid:
            t, h, w = grid
            raise ValueError(f"superres.model.grid {list(sr.grid)} up-samples {sr.lr_grid} codes, but the video "
                             f"tokenizer makes {grid} of the demo's clips: set superres.model.grid = [{t}, {2 * h}, "
                             f"{2 * w}] and windows that tile it")


TRAINING_STAGES = ("video_tokenizer", "audio_tokenizer", "llm", "superres")


class Stages:
    """Runs stages as child runs of one parent run and keeps their wall times."""

    def __init__(self, parent):
        self.parent = parent
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, params=None, own_run: bool = False):
        """`fn(run)`; with `own_run` the stage opens its child run itself (apps that log while they train)."""
        print(f"[demo] {name} ...", flush=True)
        began = time.perf_counter()
        if own_run:
            result = fn(self.parent)
        else:
            with self.parent.child(name, params) as child:
                result = fn(child)
        self.seconds[name] = time.perf_counter() - began
        self.parent.log_metrics({f"seconds.{name}": self.seconds[name]})
        print(f"[demo] {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result


def check_stage(cfg: DemoConfig, manifest: str):
    """Decode the corpus at the tokenizers' clip settings and read it back with the oracle: the data baseline."""
    def run(tracker):
        rows = read_manifest(manifest).to_pylist()
        reads, expected = [], []
        for row in rows:
            for clip in decode(row["path"], cfg.tokenize.media).clips:
                reads.append(read_attributes(clip.frames, clip.audio, cfg.tokenize.media.sample_rate))
                expected.append({a: row[a] for a in ATTRIBUTES})
        scores = score_av(reads, expected)
        tracker.log_metrics({f"oracle.{k}": v for k, v in scores.items()})
        return scores
    return run


def generate_stage(cfg: DemoConfig, folder: RunFolder, manifest: str):
    def run(tracker):
        with staged_folder(folder.uri("samples")) as samples:
            return _generate(cfg, folder, manifest, samples, tracker)
    return run


def _generate(cfg: DemoConfig, folder: RunFolder, manifest: str, samples: Path, tracker) -> dict:
    poet = VideoPoet.load(model_dir(folder.uri("llm")), sr=[model_dir(folder.uri("superres"))])
    rows = read_manifest(manifest).to_pylist()
    trained = [r for r in rows if r.get("split") != "val"]
    held_out = [r for r in rows if r.get("split") == "val"]
    figures = {**text_to_video(cfg, poet, samples),
               **image_to_video(cfg, poet, trained[: cfg.image_samples], held_out[: cfg.image_samples], samples),
               **video_to_audio(cfg, poet, held_out[: cfg.audio_samples], samples)}
    tracker.log_metrics({f"{task}.{k}": v for task, scores in figures.items() for k, v in scores.items()})
    tracker.log_artifact(samples, "samples")
    return figures


def _sampling(cfg: DemoConfig, i: int) -> SamplingConfig:
    return replace(cfg.sampling, seed=cfg.seed + i)


def text_to_video(cfg: DemoConfig, poet: VideoPoet, samples: Path) -> dict:
    """Every trained combination once (at most `prompts`), the first `sr_samples` also through the 2x stage, and
    the held-out combinations."""
    rng = np.random.default_rng(cfg.seed)
    combos = [dict(zip(ATTRIBUTES, c)) for c in np.array(np.meshgrid(SHAPES, COLORS, MOTIONS, indexing="ij"))
              .reshape(3, -1).T.tolist()]
    held = held_out_combinations(cfg.held_out)
    prompts = [combos[i] for i in rng.permutation(len(combos)) if attribute_key(combos[i]) not in held]
    prompts = prompts[: cfg.prompts]
    unseen = [c for c in combos if attribute_key(c) in held][: cfg.prompts]
    reads, high_reads = [], []
    results = poet.generate_batch("text_to_video", [Condition(caption(a)) for a in prompts], sampling=_sampling(cfg, 0))
    for i, (attributes, result) in enumerate(zip(prompts, results)):
        name = f"{i}_{caption(attributes).replace(' ', '_')}"
        reads.append(read_video_attributes(result.frames))
        if i < 4:
            write_video(str(samples / f"t2v_{name}.mp4"), result.frames, poet.media.fps)
        if i < cfg.sr_samples:
            _, high = poet.upsample(result.video_codes, caption(attributes), seed=cfg.seed + i)
            high_reads.append(read_video_attributes(high))
            write_video(str(samples / f"sr_{name}.mp4"), side_by_side(result.frames, high), poet.media.fps)
    figures = {"text_to_video": score(reads, prompts),
               "text_to_video_2x": score(high_reads, prompts[: len(high_reads)])}
    if unseen:
        results = poet.generate_batch("text_to_video", [Condition(caption(a)) for a in unseen],
                                      sampling=_sampling(cfg, 0))
        figures["text_to_video_held_out"] = score([read_video_attributes(r.frames) for r in results], unseen)
    return figures


def image_to_video(cfg: DemoConfig, poet: VideoPoet, trained: list[dict], held_out: list[dict],
                   samples: Path) -> dict:
    """A clip's first frame and caption -> a clip: of training clips (recall) and of held-out ones, next to the
    baseline of a held-out first frame held still (shape and color right, motion left to the oracle's reading of a
    still)."""
    def sample(rows: list[dict], name: str) -> tuple[dict, list[np.ndarray]]:
        clips = [decode(row["path"], poet.media).clips[0].frames for row in rows]
        results = poet.generate_batch("image_to_video", [Condition(row["caption"], frames[:1])
                                                         for row, frames in zip(rows, clips)],
                                      sampling=_sampling(cfg, 0))
        for i, (frames, result) in enumerate(zip(clips[:2], results)):
            write_video(str(samples / f"{name}_{i}.mp4"), side_by_side(frames, result.frames), poet.media.fps)
        reads = [read_video_attributes(result.frames) for result in results]
        return score(reads, [{a: row[a] for a in ATTRIBUTES} for row in rows]), [frames[:1] for frames in clips]

    seen, _ = sample(trained, "i2v_trained")
    unseen, firsts = sample(held_out, "i2v_held_out")
    stills = [read_video_attributes(np.repeat(first, poet.media.clip_frames, axis=0)) for first in firsts]
    return {"image_to_video": seen, "image_to_video_held_out": unseen,
            "image_to_video_still": score(stills, [{a: row[a] for a in ATTRIBUTES} for row in held_out])}


def video_to_audio(cfg: DemoConfig, poet: VideoPoet, rows: list[dict], samples: Path) -> dict:
    """A clip's frames -> its sound, and what the tokens keep: the oracle on the tokenizers' reconstruction."""
    reads, reconstructed = [], []
    clips = [decode(row["path"], poet.media).clips[0] for row in rows]
    results = poet.generate_batch("video_to_audio", [Condition(frames=clip.frames) for clip in clips],
                                  sampling=_sampling(cfg, 0))
    for i, (clip, result) in enumerate(zip(clips, results)):
        reads.append(read_audio_attributes(result.audio, poet.media.sample_rate))
        frames = poet.decode_video(poet.encode_video(clip.frames))
        audio = poet.decode_audio(poet.encode_audio(clip.audio))
        reconstructed.append(read_attributes(frames, audio, poet.media.sample_rate))
        if i < 4:
            write_video(str(samples / f"v2a_{i}.mp4"), clip.frames, poet.media.fps, result.audio,
                        poet.media.sample_rate)
    expected = [{a: row[a] for a in ATTRIBUTES} for row in rows]
    return {"video_to_audio": score(reads, expected), "tokenizer_roundtrip": score_av(reconstructed, expected)}


def side_by_side(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Low-res frames enlarged by pixel repetition (no smoothing, so the stage's own detail shows) left of the
    high-res frames."""
    factor = high.shape[1] // low.shape[1]
    enlarged = low.repeat(factor, axis=1).repeat(factor, axis=2)
    return np.concatenate([enlarged, high], axis=2)


def run_demo(cfg: DemoConfig, out: str) -> dict:
    folder = RunFolder(out)
    began = time.perf_counter()
    with folder.hold("demo"):
        folder.write_text("demo_config.json", json.dumps(redact_values(to_dict(cfg)), indent=2) + "\n")
        store = None if folder.remote else folder.location  # a server otherwise (`check_store`)
        with start_run(cfg.tracking, store, "demo", params={"clips": cfg.clips, "seed": cfg.seed}) as parent:
            summary = _stages(cfg, folder, parent, began)
    print_summary(summary, folder)
    return summary


def _stages(cfg: DemoConfig, folder: RunFolder, parent, began: float) -> dict:
    stages = Stages(parent)
    manifest, held_out = stages.run("synth", lambda run: synth_corpus(cfg, folder, run), cfg.synth)
    data = stages.run("check", check_stage(cfg, manifest))
    video = stages.run("video_tokenizer", lambda p: train_tokenizer(
        "video", cfg.video_tokenizer, manifest, folder.uri("video_tokenizer"), parent=p), own_run=True)
    audio = stages.run("audio_tokenizer", lambda p: train_tokenizer(
        "audio", cfg.audio_tokenizer, manifest, folder.uri("audio_tokenizer"), parent=p), own_run=True)
    tokenized = stages.run("tokenize", lambda run: _tokenize(cfg, folder, manifest, video, audio, run), cfg.tokenize)
    shards = folder.uri("shards")
    llm = stages.run("llm", lambda p: train_llm(cfg.llm, shards, folder.uri("llm"), parent=p), own_run=True)
    superres = stages.run("superres", lambda p: train_sr(cfg.superres, shards, folder.uri("superres"), parent=p),
                          own_run=True)
    figures = stages.run("generate", generate_stage(cfg, folder, manifest), cfg.sampling)
    stages.run("eval", lambda p: run_eval(replace(cfg.eval, max_samples=cfg.eval_samples), folder.uri("llm"),
                                          "synthetic", folder.uri("eval"), parent=p, real=held_out), own_run=True)
    summary = {
        "adherence": {name: figures[name]["all"] for name in ADHERENCE if name in figures},
        "chance": {"all_attributes": CHANCE_ALL, "shape": 1 / len(SHAPES), "color": 1 / len(COLORS),
                   "motion": 1 / len(MOTIONS)},
        "scores": figures,
        "data_oracle": {"video": data["video.all"], "audio": data["audio.all"]},
        "tokenizers": {"video": video["metrics"], "audio": audio["metrics"]},
        "tokenize": {k: tokenized[k] for k in ("clips", "inputs_failed", "clips_per_s")},
        "llm": llm["metrics"],
        "superres": superres["metrics"],
        "eval": f"{folder.uri('eval')}/metrics.json",
        "stage_seconds": stages.seconds,
        "total_seconds": time.perf_counter() - began,
        "mlflow": {"tracking_uri": parent.uri, "run_id": parent.run_id,
                   "ui": ui_url(parent.uri, parent.experiment_id) if parent.run_id else ""},
    }
    write_summary(folder, parent, summary)
    parent.log_metrics({"total_seconds": summary["total_seconds"],
                        **{f"adherence.{k}": v for k, v in summary["adherence"].items()}})
    return summary


def synth_corpus(cfg: DemoConfig, folder: RunFolder, tracker) -> tuple[str, str]:
    """The world's corpus (`corpus/manifest.jsonl`), what trains on it: its clips but those of held-out combinations
    (`corpus/train.jsonl`), and that manifest's `val` rows (`corpus/val.jsonl`, FVD's reference: clips no model
    trained on). Returns the locations of the last two."""
    manifests = ("manifest.jsonl", "train.jsonl", "val.jsonl")
    with staged_folder(folder.uri("corpus"), last=manifests) as corpus:
        rows = write_corpus(corpus, cfg.synth, cfg.clips, cfg.seed)
        held = held_out_combinations(cfg.held_out)
        train = [r for r in rows if attribute_key(r) not in held]
        save_text(corpus / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train))
        save_text(corpus / "val.jsonl", "".join(json.dumps(r) + "\n" for r in train if r.get("split") == "val"))
        tracker.log_metrics({"clips": len(rows), "clips_trained_on": len(train)})
        tracker.log_artifact(corpus / "manifest.jsonl")
    return folder.uri("corpus/train.jsonl"), folder.uri("corpus/val.jsonl")


def _tokenize(cfg: DemoConfig, folder: RunFolder, manifest: str, video: dict, audio: dict, tracker) -> dict:
    job = TokenizeJob(cfg.tokenize, manifest, folder.uri("shards"), video["tokenizer"], audio["tokenizer"])
    summary = job.run()
    tracker.log_metrics(summary_metrics(summary))
    job.log_lineage(tracker, summary)
    return summary


def print_summary(summary: dict, folder: RunFolder) -> None:
    scores = summary["scores"]
    print(f"\nvideopoet demo: prompt adherence measured by the synthetic world's oracle "
          f"(chance for all three attributes: {summary['chance']['all_attributes']:.1%})")
    print(f"{'':<24} {'shape':>7} {'color':>7} {'motion':>7} {'all':>7}")
    for name in (n for n in ADHERENCE if n in scores):
        s = scores[name]
        print(f"{name:<24} " + " ".join(f"{s[a]:>7.1%}" for a in (*ATTRIBUTES, "all")))
    still = scores["image_to_video_still"]  # image-to-video's baseline: a held-out first frame held still
    print(f"{'  the frame held still':<24} " + " ".join(f"{still[a]:>7.1%}" for a in (*ATTRIBUTES, "all")))
    tokens = scores["tokenizer_roundtrip"]
    print(f"{'tokens (video)':<24} " + " ".join(f"{tokens[f'video.{a}']:>7.1%}" for a in (*ATTRIBUTES, "all")))
    print(f"{'tokens (audio)':<24} " + " ".join(f"{tokens[f'audio.{a}']:>7.1%}" for a in (*ATTRIBUTES, "all")))
    print(f"{'chance':<24} " + " ".join(f"{summary['chance'][a]:>7.1%}" for a in ATTRIBUTES)
          + f" {summary['chance']['all_attributes']:>7.1%}")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items())
    print(f"stages: {stages}; total {summary['total_seconds']:.0f} s")
    print(f"summary: {folder.uri(SUMMARY_FILE)}; samples: {folder.uri('samples')}")
    if summary["mlflow"]["run_id"]:
        uri = summary["mlflow"]["tracking_uri"]
        serve = "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}, then open "
        print(f"MLflow:  {serve}{summary['mlflow']['ui']}")


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The demo's config from its arguments (file, then `--set`, then `--quiet`); raises ConfigError or ValueError."""
    refuse_vocab_overrides(args.overrides, "llm.")
    base = to_dict(DemoConfig()) if args.config is None else to_dict(load_config(DemoConfig, args.config))
    quiet = [f"{stage}.train.progress=false" for stage in TRAINING_STAGES] if args.quiet else []
    return from_dict(DemoConfig, apply_overrides(base, [*args.overrides, *quiet]))


def run(args: argparse.Namespace) -> int:
    """`videopoet demo` with its arguments parsed (`apps.cli`)."""
    try:
        cfg = demo_config(args)
        check_store(cfg.tracking, args.out)
        check_folder(args.out)
    except (ConfigError, ValueError) as e:
        print(f"videopoet demo: {e}", file=sys.stderr)
        return 2
    try:
        run_demo(cfg, args.out)
    except Busy as e:
        print(f"videopoet demo: {e}", file=sys.stderr)
        return 2
    return 0
