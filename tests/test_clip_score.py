"""CLIP similarity with a tiny random-init open_clip model (registered through open_clip.add_model_config), checked
against open_clip's own preprocessing and a by-hand computation."""

import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from eval.clip_score import ClipConfig, ClipEncoder, ClipScorer, ClipSimilarity

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
TINY = "vp-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """Register the tiny architecture with open_clip and save a random init as a local checkpoint."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    weights = folder / "tiny.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), weights)
    return str(weights)


def read_frames(name: str, count: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """The first `count` RGB frames of a corpus file, decoded by ffmpeg, (count, H, W, 3) uint8."""
    path = REAL / name
    if not path.exists():
        pytest.skip(f"real corpus file {path} is missing")
    scale = ["-vf", f"scale={size[1]}:{size[0]}"] if size else []
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), *scale, "-frames:v",
                            str(count), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    frames = np.frombuffer(probe.stdout, np.uint8).copy()
    h, w = size or {"chaplin.mp4": (360, 640)}[name]
    return frames.reshape(count, h, w, 3)


def test_preprocessing_matches_open_clip_transform(tiny_weights):
    encoder = ClipEncoder(ClipConfig(model=TINY, weights=tiny_weights))
    frames = read_frames("chaplin.mp4", 3)  # 640x360: shorter-side resize and center crop
    ours = encoder.preprocess(torch.from_numpy(frames))
    reference_transform = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(encoder.model)),
                                             is_train=False)
    reference = torch.stack([reference_transform(Image.fromarray(f)) for f in frames])
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    # In uint8 levels: torchvision and PIL round a few pixels differently, by one level at most.
    levels = (ours - reference).abs() * torch.tensor(encoder.std)[:, None, None] * 255
    assert levels.mean() < 0.01 and levels.max() < 1.01


def test_scores_match_direct_computation(tiny_weights):
    scorer = ClipScorer(ClipConfig(model=TINY, weights=tiny_weights, batch_size=4))
    videos = np.stack([read_frames("chaplin.mp4", 3), read_frames("chaplin.mp4", 3)[::-1]])
    captions = [json.loads(line)["caption"] for line in (REAL / "captions.jsonl").read_text().splitlines()
                if json.loads(line)["path"] == "chaplin.mp4"] + ["television color bars test pattern"]
    result = scorer(videos, captions)

    model, tokenizer = scorer.encoder.model, open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        images = scorer.encoder.preprocess(torch.from_numpy(videos.reshape(6, 360, 640, 3)))
        image_emb = model.encode_image(images)
        text_emb = model.encode_text(tokenizer(captions))
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    cosines = np.array([[float(image_emb[3 * b + t] @ text_emb[b]) for t in range(3)] for b in range(2)])
    np.testing.assert_allclose(result.clip_similarity, cosines.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.clip_score, np.maximum(100 * cosines, 0).mean(axis=1), rtol=1e-5, atol=1e-4)
    summary = result.summary()
    assert summary["videos"] == 2
    assert summary["clip_similarity"] == pytest.approx(cosines.mean(), abs=1e-6)


def test_clip_score_clamps_each_frame():
    cosines = np.array([[0.3, -0.1], [-0.2, -0.4]])
    result = ClipSimilarity.from_cosines(cosines)
    np.testing.assert_allclose(result.clip_similarity, [0.1, -0.3])
    np.testing.assert_allclose(result.clip_score, [15.0, 0.0])
    both = ClipSimilarity.concat([result, result])
    assert both.summary() == {"clip_similarity": pytest.approx(-0.1), "clip_score": 7.5, "videos": 4}


def test_bad_inputs_name_the_problem(tiny_weights, tmp_path):
    with pytest.raises(FileNotFoundError, match="ClipConfig.weights"):
        ClipEncoder(ClipConfig(model=TINY, weights=str(tmp_path / "missing.pt")))
    scorer = ClipScorer(ClipConfig(model=TINY, weights=tiny_weights))
    videos = np.zeros((2, 2, 40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="expected one per video \\(2\\), got 1"):
        scorer(videos, ["a cat"])
    with pytest.raises(ValueError, match="empty caption at index 1"):
        scorer(videos, ["a cat", " "])
    with pytest.raises(ValueError, match="expected uint8"):
        scorer(videos.astype(np.float32), ["a", "b"])
