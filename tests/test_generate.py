"""`videopoet generate` on a random-init export: every task samples, parses, decodes and writes a readable MP4."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.config import from_dict, load_config, to_dict
from pipeline.generation import Condition, SamplingConfig, VideoPoet
from pipeline.magvit import MagvitConfig
from pipeline.masking import DecodingConfig
from pipeline.media import MediaConfig, decode, write_video
from pipeline.sequence import Task, central_mask
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.text import TextConfig, WordVocabulary
from apps.cli import generate as main

MEDIA = MediaConfig(height=32, width=32)


@pytest.fixture(scope="module")
def export(llm_export):
    root = llm_export(["a red circle moving left", "a blue square moving up"], MEDIA)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    words = WordVocabulary.load(root / "run" / "model" / "words.json")
    # A 2x super-resolution stage on the same tokenizer: (5, 4, 4) -> (5, 8, 8) codes, i.e. 32x32 -> 64x64 frames.
    sr = SuperResConfig(grid=(5, 8, 8), windows=((1, 8, 2), (1, 2, 8), (5, 2, 2)), bits=video.quantizer.bits,
                        width=16, heads=2, blocks=1, mlp_ratio=2, text_dim=8, text_vocab=words.size,
                        decoding=DecodingConfig(steps=3))
    save_checkpoint(root / "sr" / "model", SuperResTransformer(sr), sr,
                    extra={"tokenizers": {"video": {"location": str(root / "video")}}, "text": to_dict(TextConfig())})
    words.save(root / "sr" / "model" / "words.json")
    return root


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(str(path), rng.integers(0, 255, (17, 32, 32, 3), dtype=np.uint8), 8,
                (0.1 * rng.standard_normal(34000)).astype(np.float32))
    return path


@pytest.mark.parametrize("task", list(Task))
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
    # What the condition fixes is kept as given: the image starts the clip, the visible codes of painting stay.
    if task == Task.IMAGE_TO_VIDEO:
        assert np.array_equal(out.video_codes[0], poet.encode_video(frames[:1])[0])
    if task in (Task.INPAINTING, Task.OUTPAINTING):
        hidden = central_mask(poet.latent_grid)
        hidden = hidden if task == Task.INPAINTING else ~hidden
        assert np.array_equal(out.video_codes[~hidden], poet.encode_video(frames)[~hidden])


@pytest.mark.parametrize("task", [Task.TEXT_TO_VIDEO, Task.IMAGE_TO_VIDEO, Task.VIDEO_TO_AUDIO])
def test_a_batch_generates_what_each_condition_generates_alone(export, task):
    poet = VideoPoet.load(export / "run" / "model")
    rng = np.random.default_rng(2)
    # Captions of two lengths (two layouts in one call) and a batch size that splits them.
    prompts = ["a red circle moving left", "a blue square", "a blue square moving up", "a red circle moving up"]
    conditions = [Condition(prompt, rng.integers(0, 255, (17, 32, 32, 3), dtype=np.uint8),
                            (0.1 * rng.standard_normal(34000)).astype(np.float32)) for prompt in prompts]
    sampling = SamplingConfig(top_k=8, seed=5)
    batch = poet.generate_batch(task, conditions, sampling=sampling, batch_size=2)
    for i, (c, out) in enumerate(zip(conditions, batch)):
        alone = poet.generate(task, prompt=c.prompt, frames=c.frames, audio=c.audio,
                              sampling=replace(sampling, seed=5 + i))
        np.testing.assert_array_equal(out.ids, alone.ids)
        np.testing.assert_array_equal(out.frames, alone.frames)
        if task == Task.VIDEO_TO_AUDIO:
            np.testing.assert_array_equal(out.audio, alone.audio)
    assert len({out.ids.tobytes() for out in batch}) == len(batch)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        poet.generate_batch(task, conditions, batch_size=0)


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


def test_cli_upsamples_through_a_super_resolution_stage(export, tmp_path, capsys):
    out = tmp_path / "high.mp4"
    assert main(["--checkpoint", str(export / "run"), "--task", "text_to_video", "--prompt", "a red circle moving left",
                 "--sr", str(export / "sr"), "--out", str(out), "--top-k", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["size"] == [64, 64] and report["frames"] == 17
    decoded = decode(str(out), MediaConfig(height=64, width=64, short="pad"))
    assert decoded.ok and decoded.clips[0].frames.shape == (17, 64, 64, 3)
    tokens = np.load(out.with_suffix(".tokens.npz"))
    assert tokens["video_codes"].shape == (5, 4, 4) and tokens["hr_video_codes"].shape == (5, 8, 8)


def test_super_resolution_of_an_image_and_a_cascade_that_does_not_chain(export):
    poet = VideoPoet.load(export / "run" / "model", sr=[export / "sr" / "model"])
    image = np.random.default_rng(2).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
    assert poet.upsample_frames(image, prompt="a blue square").shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"takes codes \(5, 4, 4\), but stage .* gives \(5, 8, 8\)"):
        VideoPoet.load(export / "run" / "model", sr=[export / "sr" / "model"] * 2)


def test_cli_loads_an_export_from_mlflow(export, tmp_path, monkeypatch, capsys):
    import apps.generate
    from pipeline.tracking import TrackingConfig, start_run

    monkeypatch.setattr(apps.generate, "CACHE", tmp_path / "cache")
    with start_run(TrackingConfig(), tmp_path / "store", "llm") as run:
        run.log_artifact(export / "run" / "model", "model")
    args = ["--task", "text_to_image", "--prompt", "a red circle moving left", "--out", str(tmp_path / "a.mp4")]
    assert main(["--checkpoint", f"runs:/{run.run_id}/model", "--tracking-uri", run.uri, *args]) == 0
    assert (tmp_path / "cache" / run.run_id / "model" / "model.safetensors").exists()
    assert (tmp_path / "a.mp4").exists()
    capsys.readouterr()
    assert main(["--checkpoint", "runs:/0123456789abcdef/model", "--tracking-uri", run.uri, *args]) == 2
    assert "runs:/0123456789abcdef/model: cannot fetch it from" in capsys.readouterr().err
    assert main(["--checkpoint", f"runs:/{run.run_id}/model", "--tracking-uri", "", *args]) == 2
    assert "give the MLflow tracking URI" in capsys.readouterr().err


def test_cli_loads_an_export_from_object_storage(export, s3, tmp_path, monkeypatch, capsys):
    """A run folder in a bucket whose export names its tokenizers by URI, as `train llm --out s3://...` writes it;
    the local copy is fetched again once the export there changes."""
    from pipeline.checkpoint import read_metadata
    from pipeline.llm import LLMConfig, VideoPoetLM
    from pipeline.storage import upload_folder

    monkeypatch.setattr("pipeline.checkpoint.EXPORT_CACHE", tmp_path / "cache")
    for name in ("video", "audio"):
        upload_folder(export / name, f"s3://bucket/exp/{name}")
    model = tmp_path / "model"
    meta = read_metadata(export / "run" / "model")
    meta["extra"]["tokenizers"] = {name: {"location": f"s3://bucket/exp/{name}"} for name in ("video", "audio")}
    (model / "config.json").parent.mkdir()
    (model / "words.json").write_bytes((export / "run" / "model" / "words.json").read_bytes())
    (model / "model.safetensors").write_bytes((export / "run" / "model" / "model.safetensors").read_bytes())
    (model / "config.json").write_text(json.dumps(meta))
    upload_folder(model, "s3://bucket/exp/run/model", last=("config.json",))
    args = ["--task", "text_to_image", "--prompt", "a red circle moving left", "--out", str(tmp_path / "a.mp4")]
    assert main(["--checkpoint", "s3://bucket/exp/run", *args]) == 0
    cached = tmp_path / "cache" / "s3" / "bucket" / "exp"
    assert read_metadata(cached / "run" / "model")["fingerprint"] == meta["fingerprint"]
    assert (cached / "video" / "model.safetensors").exists() and (tmp_path / "a.mp4").exists()

    torch.manual_seed(1)  # another model at the same location
    config = from_dict(LLMConfig, meta["config"])
    save_checkpoint(model, VideoPoetLM(config), config, extra=meta["extra"])
    upload_folder(model, "s3://bucket/exp/run/model", last=("config.json",))
    assert read_metadata(model)["fingerprint"] != meta["fingerprint"]
    assert main(["--checkpoint", "s3://bucket/exp/run/model", *args]) == 0
    assert read_metadata(cached / "run" / "model")["fingerprint"] == read_metadata(model)["fingerprint"]
    capsys.readouterr()
    assert main(["--checkpoint", "s3://bucket/nothing", *args]) == 2
    assert "checkpoint s3://bucket/nothing: no config.json" in capsys.readouterr().err
