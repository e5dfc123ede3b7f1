"""`videopoet generate` on a random-init export: every task samples, parses, decodes and writes a readable MP4."""

import json

import numpy as np
import pytest

from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config, to_dict
from pipeline.generation import SamplingConfig, VideoPoet
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.media import MediaConfig, decode, write_video
from pipeline.quantizers import RVQConfig
from pipeline.sequence import Task
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.text import WordVocabulary
from pipeline.vocab import Vocabulary
from train.generate import main

MEDIA = MediaConfig(height=32, width=32)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=2, codebook_size=16))
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    words = WordVocabulary.build(["a red circle moving left", "a blue square moving up"])
    vocab = Vocabulary(video_codes=2 ** video.quantizer.bits, audio_levels=2, audio_codes=16, text_size=words.size)
    cfg = load_config(LLMConfig, "debug", [], kind="llm")
    cfg = LLMConfig(**{**cfg.__dict__, "vocab": vocab})
    tokenizers = {"video": {"location": str(root / "video")}, "audio": {"location": str(root / "audio")}}
    save_checkpoint(root / "run" / "model", VideoPoetLM(cfg), cfg,
                    extra={"tokenizers": tokenizers, "media": {"media": to_dict(MEDIA)}})
    words.save(root / "run" / "model" / "words.json")
    return root


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(str(path), rng.integers(0, 255, (17, 32, 32, 3), dtype=np.uint8), 8,
                (0.1 * rng.standard_normal(34000)).astype(np.float32))
    return path


@pytest.mark.parametrize("task", [t for t in Task if t != Task.STYLIZATION])
def test_every_task_generates(export, task):
    poet = VideoPoet.load(export / "run" / "model")
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (17, 32, 32, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal(34000)).astype(np.float32)
    out = poet.generate(task, prompt="a red circle moving left", frames=frames, audio=audio,
                        sampling=SamplingConfig(top_k=8, seed=3))
    assert out.frames.dtype == np.uint8 and out.frames.shape[1:] == (32, 32, 3)
    assert len(out.frames) == (1 if task == Task.TEXT_TO_IMAGE else 17)
    if task in (Task.VIDEO_TO_AUDIO, Task.AUDIO_VIDEO_CONTINUATION):
        assert out.audio is not None and len(out.audio) == MEDIA.clip_samples


def test_cli_writes_mp4_and_tokens_with_chaining_and_extension(export, clip_file, tmp_path, capsys):
    out = tmp_path / "chain.mp4"
    assert main(["--checkpoint", str(export / "run"), "--task", "image_to_video", "--image", str(clip_file),
                 "--then", "video_to_audio", "--extend", "1", "--out", str(out), "--top-k", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["audio"] and report["frames"] > 17
    decoded = decode(str(out), MediaConfig(height=32, width=32, short="pad"))
    assert decoded.ok and decoded.clips and decoded.clips[0].audio is not None
    tokens = np.load(out.with_suffix(".tokens.npz"))
    assert "audio_codes" in tokens and tokens["ids"].ndim == 1


def test_cli_names_a_missing_condition(export, tmp_path, capsys):
    assert main(["--checkpoint", str(export / "run"), "--task", "text_to_video", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "needs --prompt" in capsys.readouterr().err
