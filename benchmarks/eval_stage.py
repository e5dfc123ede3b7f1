"""Evaluation stage speed: `videopoet eval` end to end on a random-init export, samples per second.

Builds an LLM export the way `videopoet train llm` writes one (weights, words, the record of its video and audio
tokenizers and its clip settings), all with random weights of the given flavors (speed does not depend on them), a
synthetic corpus of `--real` clips as FVD's reference set, and runs `eval.stage.run_eval` on the synthetic prompt set
(`--samples` samples: text-to-video, video-to-audio, audio-to-video in turn) with the eval config `--config`: Ray Data
generation actors -> real-clip decoding -> I3D / CLIP / oracle feature actors -> metrics, MLflow. With GPUs in the
local Ray the actors take GPU shares and run in bf16 (`eval.actors`); otherwise CPUs in float32. I3D and CLIP are
random-init, so FVD and CLIPSIM measure nothing here; this benchmark times the stage and checks that it runs.

Figures: wall time of `run_eval` (Ray start-up, actor start-up and model loading included), generated samples per
second over it, rows that failed. `ratio` = the share of rows (generated and real) that came out ok: 1.0 when the
stage ran clean. The last line printed is one JSON object.

    python benchmarks/eval_stage.py [--flavor debug] [--config debug] [--samples 4] [--real 2]
    python benchmarks/eval_stage.py --device cuda --flavor demo --config paper --samples 12 --real 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.stage import EvalConfig, run_eval
from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config, to_dict
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.media import MediaConfig
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.synth import SynthConfig, attribute_schedule, caption, write_corpus
from pipeline.text import WordVocabulary
from pipeline.vocab import Vocabulary

FLAVORS = ("debug", "demo", "paper")
FRAME_SIZE = {"debug": 32, "demo": 32, "paper": 128}  # the clip size each tokenizer flavor is trained at
LLM_FLAVOR = {"debug": "debug", "demo": "demo", "paper": "300m"}


def random_export(flavor: str, root: Path) -> tuple[Path, MediaConfig]:
    """A random-init LLM export of the flavor over random-init tokenizers of the flavor; returns its run folder."""
    torch.manual_seed(0)
    media = MediaConfig(height=FRAME_SIZE[flavor], width=FRAME_SIZE[flavor])
    video = load_config(MagvitConfig, flavor, kind="video_tokenizer")
    audio = load_config(SoundStreamConfig, flavor, kind="audio_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    words = WordVocabulary.build([caption(a) for a in attribute_schedule(0, 48)])
    cfg = load_config(LLMConfig, LLM_FLAVOR[flavor], kind="llm")
    vocab = Vocabulary(video_codes=2 ** video.quantizer.bits, audio_levels=audio.quantizer.levels,
                       audio_codes=audio.quantizer.codebook_size, text_size=words.size)
    cfg = replace(cfg, vocab=vocab, text_width=0)  # words, as the synthetic world's captions are trained
    tokenizers = {"video": {"location": str(root / "video")}, "audio": {"location": str(root / "audio")}}
    save_checkpoint(root / "run" / "model", VideoPoetLM(cfg), cfg,
                    extra={"tokenizers": tokenizers, "media": {"media": to_dict(media)}})
    words.save(root / "run" / "model" / "words.json")
    return root / "run", media


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", choices=FLAVORS, default="debug",
                        help="the export's tokenizer flavors and LLM (debug, demo, or paper: the 300m LLM)")
    parser.add_argument("--config", default="debug", help="eval config: flavor (debug, demo, paper) or TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="eval config override")
    parser.add_argument("--samples", type=int, default=4, help="generated samples")
    parser.add_argument("--real", type=int, default=2, help="synthetic reference clips for FVD (0: none)")
    parser.add_argument("--work", help="folder for the export, corpus and outputs (default: a temporary one)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="cuda: fail unless the actors get GPUs; cpu: hide the GPUs from Ray; auto: GPUs when "
                             "there are any (default)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.real < 0:
        parser.error("--samples must be >= 1 and --real >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to this process")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before Ray starts: it counts the GPUs this process can see
    cfg = load_config(EvalConfig, args.config, [*args.set, f"max_samples={args.samples}"], kind="eval")

    work = Path(args.work or tempfile.mkdtemp(prefix="videopoet-bench-eval-"))
    export, media = random_export(args.flavor, work / "export")
    manifest = None
    if args.real:
        synth = SynthConfig(frames=media.clip_frames, fps=media.fps, width=media.width * 2, height=media.height * 2)
        write_corpus(work / "real", synth, n=args.real, seed=1)
        manifest = str(work / "real" / "manifest.jsonl")
    began = time.perf_counter()
    report = run_eval(cfg, export, "synthetic", work / "eval", real=manifest)
    seconds = time.perf_counter() - began
    if args.device == "cuda" and not report["gpus"]:
        raise SystemExit("eval_stage.py --device cuda: the Ray cluster has no GPU")

    samples = report["samples"]
    rows = sum(samples.values())
    failed = samples["generated_failed"] + samples["real_failed"]
    result = {
        "benchmark": "eval_stage", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "gpus": report["gpus"],
        "device": torch.cuda.get_device_name(0) if report["gpus"] else "cpu",
        "flavor": args.flavor, "config": args.config, "overrides": args.set, "samples": samples,
        "seconds": round(seconds, 2), "samples_per_s": round(samples["generated"] / seconds, 3),
        "fvd": report["fvd"]["value"], "random_init": report["random_init"], "errors": report["errors"],
        "ratio": round((rows - failed) / rows, 3),
    }
    print(f"eval stage ({args.flavor} export, {args.config} config, {report['gpus']} GPUs): "
          f"{samples['generated']} generated + {samples['real']} real clips in {seconds:.1f} s "
          f"({result['samples_per_s']} samples/s), {failed} rows failed")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
