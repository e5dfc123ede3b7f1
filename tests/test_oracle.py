import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.oracle import (SHAPE_MOMENTS, read_attributes, read_audio_attributes, read_video_attributes, score,
                             score_av, shape_moments)
from pipeline.synth import (ATTRIBUTES, SHAPES, SynthConfig, plan, render_audio, render_video, signed_distance,
                            write_corpus)

ALL_MATCH = {f"{m}.{a}": 1.0 for m in ("video", "audio", "agreement") for a in (*ATTRIBUTES, "all")}


def render(cfg: SynthConfig, seed: int, n: int):
    specs = plan(cfg, seed, n)
    return specs, [(render_video(s, cfg), render_audio(s, cfg)) for s in specs]


def read_all(clips, sample_rate=16000):
    return [read_attributes(frames, audio, sample_rate) for frames, audio in clips]


# ---------------------------------------------------------------------------------------------- degradations

def down_up(frames: np.ndarray, factor: int) -> np.ndarray:
    """Area downsampling by `factor` and bilinear upsampling back: the detail a coarse tokenizer loses."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    size = x.shape[-2:]
    x = F.interpolate(F.interpolate(x, scale_factor=1 / factor, mode="area"), size=size, mode="bilinear")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def pixel_noise(frames: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


def audio_noise(audio: np.ndarray, snr_db: float, rng) -> np.ndarray:
    noise_power = np.mean(audio.astype(np.float64) ** 2) / 10 ** (snr_db / 10)
    return (audio + rng.normal(0, math.sqrt(noise_power), audio.shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- numpy clips

def test_shape_moments_match_the_analytic_values():
    side = 200
    offsets = np.arange(side) + 0.5 - side / 2
    for shape in SHAPES:
        coverage = np.clip(0.5 - signed_distance(shape, offsets[None, :], offsets[:, None], 0.5 * side), 0, 1)
        np.testing.assert_allclose(shape_moments(coverage[None])[0], SHAPE_MOMENTS[shape], atol=0.01, err_msg=shape)


def test_reads_rendered_clips_exactly():
    specs, clips = render(SynthConfig(fps=8, frames=17), seed=0, n=48)  # one of every combination, at 160x128
    assert score_av(read_all(clips), [s.attributes for s in specs]) == ALL_MATCH


@pytest.mark.parametrize("cfg", [
    SynthConfig(width=32, height=32, fps=8, frames=17),
    SynthConfig(width=64, height=48, fps=8, frames=5),
    SynthConfig(width=128, height=128, fps=8, frames=17, size=(0.3, 0.3), travel=(0.3, 0.3)),
], ids=["32x32", "5-frames", "no-jitter"])
def test_reads_any_resolution_and_length(cfg):
    specs, clips = render(cfg, seed=1, n=24)
    assert score_av(read_all(clips, cfg.sample_rate), [s.attributes for s in specs]) == ALL_MATCH


def test_nothing_to_read():
    blank = np.full((8, 64, 64, 3), 40, np.uint8)
    assert read_video_attributes(blank) == {"shape": None, "color": None, "motion": None}
    assert read_audio_attributes(np.zeros(16000, np.float32), 16000) == {"shape": None, "color": None, "motion": None}
    assert read_attributes(blank, None, 16000)["audio"] == {"shape": None, "color": None, "motion": None}
    cfg = SynthConfig(width=64, height=64, fps=8, frames=9)
    spec = plan(cfg, 0, 1)[0]
    still = np.repeat(render_video(spec, cfg)[:1], 9, axis=0)
    assert read_video_attributes(still) == {"shape": spec.shape, "color": spec.color, "motion": None}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="frames must be uint8"):
        read_video_attributes(np.zeros((8, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="frames must be uint8"):
        read_video_attributes(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        read_video_attributes(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="audio must be mono"):
        read_audio_attributes(np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(ValueError, match="0.2 s"):
        read_audio_attributes(np.zeros(100, np.float32), 16000)


def test_score():
    expected = [{"shape": "circle", "color": "red", "motion": "left", "caption": "ignored"},
                {"shape": "square", "color": "blue", "motion": "up"}]
    reads = [{"shape": "circle", "color": "red", "motion": "left"},
             {"shape": "square", "color": None, "motion": "up"}]
    assert score(reads, expected) == {"shape": 1.0, "color": 0.5, "motion": 1.0, "all": 0.5}
    both = [{"video": reads[0], "audio": reads[0]}, {"video": reads[1], "audio": {**reads[1], "motion": "down"}}]
    result = score_av(both, expected)
    assert result["audio.motion"] == 0.5 and result["video.all"] == 0.5
    # Two Nones agree on nothing; a wrong audio motion breaks agreement.
    assert (result["agreement.color"], result["agreement.motion"], result["agreement.all"]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="as many reads"):
        score(reads, expected[:1])


# ---------------------------------------------------------------------------------------------- through media

@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """A few dozen clips written as H.264/AAC MP4 (160x128 at 24 fps) and decoded at 128x128 and 64x64, 8 fps."""
    media = pytest.importorskip("pipeline.media")
    out = tmp_path_factory.mktemp("synth")
    rows = write_corpus(out, SynthConfig(), n=32, seed=4)
    results = {}
    for size in (128, 64):
        cfg = media.MediaConfig(fps=8, height=size, width=size, clip_frames=17, sample_rate=16000)
        clips = []
        for row in rows:
            result = media.decode(str(out / row["path"]), cfg)
            assert result.ok and len(result.clips) == 1, (row["path"], result.error)
            clip = result.clips[0]
            assert clip.frames.shape == (17, size, size, 3) and clip.audio.shape == (34000,)
            clips.append((clip.frames, clip.audio))
        results[size] = clips
    return rows, results


@pytest.mark.parametrize("size", [128, 64])
def test_round_trip_through_media(decoded, size):
    rows, results = decoded
    result = score_av(read_all(results[size]), rows)
    assert min(result.values()) >= 0.99, result


@pytest.mark.parametrize("size", [128, 64])
def test_survives_lossy_tokenizer_stand_ins(decoded, size):
    rows, results = decoded
    rng = np.random.default_rng(0)
    degraded = [(pixel_noise(down_up(frames, 4), 12.0, rng), audio_noise(audio, 5.0, rng))
                for frames, audio in results[size]]
    result = score_av(read_all(degraded), rows)
    assert min(result.values()) >= 0.95, result


@pytest.mark.parametrize("rows", [1, 8], ids=["line", "bar"])
def test_elongated_blob_is_no_shape(rows):
    frames = np.full((6, 64, 64, 3), 30, np.uint8)
    for t in range(6):
        frames[t, 20:20 + rows, 10 + 6 * t: 30 + 6 * t] = (230, 30, 30)  # a red line or bar moving right
    assert read_video_attributes(frames) == {"shape": None, "color": "red", "motion": "right"}
