"""Clip decoding and MP4 writing against the real corpus, real ffmpeg, and references computed independently."""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import media
from pipeline.ffmpeg import (CorruptMedia, DecodeTimeout, EmptyFile, MissingFile, NoVideoStream, NotMedia, TooShort,
                             ffmpeg_exe)
from pipeline.media import Clip, MediaConfig, decode, iter_clips, write_video

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"real media corpus not found at {CORPUS}")

# Durations from SOURCES.md / the container headers; 8 fps output frames = round(duration * 8), and clips of 17
# with stride 17 = (frames - 17) // 17 + 1. (file, clips, has audio, error kind)
EXPECTED = {
    "chaplin.mp4": (4, True, None),  # 9.64 s -> 77 frames
    "corrupted.mp4": (1, False, "corrupt"),  # the h264 decoder fails at 2.8 s -> 22 frames before the damage
    "crunching.mp3": (0, True, "no_video"),
    "example.mp4": (7, False, None),  # 16 s -> 128 frames, no audio stream
    "example.wav": (0, True, "no_video"),
    "fire2.mp4": (1, True, None),  # 2.38 s variable frame rate, rotated 180 -> 19 frames
    "flipping_a_pancake.mkv": (4, True, None),  # 10.38 s -> 83 frames
    "no_duration.webm": (2, True, None),  # 4.94 s (no header duration) -> 40 frames
    "result.webm": (0, False, "empty"),
    "smpte-2997.mp4": (4, True, None),  # 10.05 s -> 80 frames
    "transparent.webm": (2, True, None),  # 5.0 s with alpha -> 40 frames
    "video_90.mov": (1, False, None),  # 0.1 s -> 1 frame, padded to a clip
    # ffmpeg 9 decodes this MP3 track without an error (the failure is in moviepy's reader): 11.23 s -> 90 frames
    "video_with_failing_audio.mp4": (5, True, None),
}
NOT_MEDIA = {"SOURCES.md", "captions.jsonl"}


@functools.cache
def decoded(name: str, **changes) -> media.DecodeResult:
    return decode(str(CORPUS / name), MediaConfig(**changes))


def ffmpeg_raw(path: Path, vf: str, width: int, height: int, *input_args: str) -> np.ndarray:
    """Frames by a plain ffmpeg command, at the given size (the reference for our filter chain)."""
    out = subprocess.run([ffmpeg_exe(), "-v", "error", *input_args, "-i", str(path), "-vf", vf, "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def ffmpeg_audio(path: Path, sample_rate: int = 16000) -> np.ndarray:
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar",
                          str(sample_rate), "-f", "f32le", "pipe:"], capture_output=True, check=True).stdout
    return np.frombuffer(out, np.float32)


def cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover (height, width) keeping the aspect, then center-crop: torch's antialiased bilinear."""
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(sh, sw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (sh - height) // 2, (sw - width) // 2
    x = x[..., top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def synthetic(seconds: float, fps: float = 8.0, size: tuple[int, int] = (48, 64), sample_rate: int = 16000):
    """Smooth moving colour waves and a 440 Hz tone."""
    t = np.arange(round(seconds * fps))[:, None, None, None]
    y = np.arange(size[0])[None, :, None, None]
    x = np.arange(size[1])[None, None, :, None]
    phase = np.array([0.0, 0.6, 1.2])
    frames = (128 + 80 * np.sin(x / 7 + y / 11 + t / 3 + phase)).astype(np.uint8)
    n = round(seconds * sample_rate)
    audio = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sample_rate)).astype(np.float32)
    return frames, audio


# ---------------------------------------------------------------------------------------------------- corpus

@needs_corpus
def test_every_corpus_file_has_an_expectation():
    assert {p.name for p in CORPUS.iterdir()} - NOT_MEDIA == set(EXPECTED)


@needs_corpus
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_gives_expected_clips_or_error(name):
    clips, has_audio, kind = EXPECTED[name]
    result = decoded(name)
    assert len(result.clips) == clips
    assert (result.error.kind if result.error else None) == kind
    if kind is not None:
        assert str(CORPUS / name) in str(result.error) and result.error.path == str(CORPUS / name)
    if kind in (None, "corrupt", "no_video"):  # ffmpeg opened the file and described it
        assert result.info.path == str(CORPUS / name) and result.info.duration > 0
    for i, clip in enumerate(result.clips):
        assert clip.index == i and clip.id == f"{CORPUS / name}#{i}"
        assert clip.frames.shape == (17, 128, 128, 3) and clip.frames.dtype == np.uint8
        assert clip.start == pytest.approx(i * 17 / 8) and clip.end == pytest.approx(clip.start + 2.125)
        if has_audio:
            assert clip.audio.shape == (34000,) and clip.audio.dtype == np.float32
        else:
            assert clip.audio is None


@needs_corpus
def test_audio_only_and_unreadable_files_raise_typed_errors():
    with pytest.raises(NoVideoStream) as e:
        list(iter_clips(str(CORPUS / "example.wav")))
    assert e.value.kind == "no_video" and "example.wav" in str(e.value)
    with pytest.raises(EmptyFile):
        list(iter_clips(str(CORPUS / "result.webm")))
    with pytest.raises(NotMedia):
        list(iter_clips(str(CORPUS / "SOURCES.md")))
    with pytest.raises(MissingFile) as e:
        list(iter_clips(str(CORPUS / "nope.mp4")))
    assert e.value.kind == "missing" and e.value.path.endswith("nope.mp4")


@needs_corpus
def test_corrupt_file_streams_good_clips_then_raises():
    seen = []
    with pytest.raises(CorruptMedia) as e:
        for clip in iter_clips(str(CORPUS / "corrupted.mp4")):
            seen.append(clip)
    assert len(seen) == 1 and e.value.kind == "corrupt" and "corrupted.mp4" in str(e.value)
    # The good clip is the file's real content, not concealment garbage.
    reference = cover_crop(ffmpeg_raw(CORPUS / "corrupted.mp4", "fps=8:start_time=0", 1280, 720)[:17], 128, 128)
    assert mae(seen[0].frames, reference) < 6


@needs_corpus
def test_frames_match_an_independent_resize_and_crop():
    for name, height, width in [("flipping_a_pancake.mkv", 128, 128), ("chaplin.mp4", 224, 128)]:
        result = decoded(name, height=height, width=width)
        ours = np.concatenate([c.frames for c in result.clips])
        assert ours.shape == (68, height, width, 3)
        info = result.info
        reference = cover_crop(ffmpeg_raw(CORPUS / name, "fps=8:start_time=0", info.width, info.height),
                               height, width)[:68]
        assert mae(ours, reference) < 8
        assert mae(ours[1:], reference[:-1]) > 1.5 * mae(ours, reference)  # a one-frame shift is visible


@needs_corpus
def test_audio_windows_match_a_whole_track_decode():
    result = decoded("flipping_a_pancake.mkv")
    track = ffmpeg_audio(CORPUS / "flipping_a_pancake.mkv")
    for clip in result.clips:
        ref = track[clip.index * 34000:(clip.index + 1) * 34000]
        assert np.corrcoef(clip.audio, ref)[0, 1] > 0.99
        assert np.abs(clip.audio - ref).max() < 0.05


@needs_corpus
def test_rotated_short_video_is_portrait_and_padded_or_skipped():
    result = decoded("video_90.mov", height=224, width=128)
    assert result.info.rotation == 90 and (result.info.width, result.info.height) == (320, 568)
    (clip,) = result.clips
    assert clip.frames.shape == (17, 224, 128, 3) and clip.padded_frames == 16 and clip.audio is None
    assert all((clip.frames[i] == clip.frames[0]).all() for i in range(17))
    # Upright = the stored frame turned 90 degrees clockwise (np.rot90 with k=-1), not counter-clockwise.
    stored = ffmpeg_raw(CORPUS / "video_90.mov", "fps=8:start_time=0", 568, 320, "-noautorotate")
    clockwise = cover_crop(np.rot90(stored, k=-1, axes=(1, 2)), 224, 128)[0]
    counter = cover_crop(np.rot90(stored, k=1, axes=(1, 2)), 224, 128)[0]
    assert mae(clip.frames[0], clockwise) < 15 < 30 < mae(clip.frames[0], counter)

    skipped = decoded("video_90.mov", short="skip")
    assert skipped.clips == [] and isinstance(skipped.error, TooShort) and skipped.error.kind == "too_short"


@needs_corpus
def test_alpha_is_composited_over_black():
    ours = decoded("transparent.webm", height=200, width=200).clips[0].frames
    rgba = subprocess.run([ffmpeg_exe(), "-v", "error", "-c:v", "libvpx-vp9", "-i", str(CORPUS / "transparent.webm"),
                           "-vf", "fps=8:start_time=0,format=rgba", "-frames:v", "17", "-f", "rawvideo", "pipe:"],
                          capture_output=True, check=True).stdout
    rgba = np.frombuffer(rgba, np.uint8).reshape(17, 200, 200, 4).astype(np.float32)
    reference = np.round(rgba[..., :3] * rgba[..., 3:] / 255).astype(np.uint8)
    assert mae(ours, reference) < 2
    assert (ours[rgba[..., 3] == 0] <= 2).all()


@needs_corpus
def test_stride_overlap_gap_and_max_clips():
    # pancake: 83 frames at 8 fps.
    overlap = decoded("flipping_a_pancake.mkv", stride_frames=8, height=32, width=32)
    assert len(overlap.clips) == (83 - 17) // 8 + 1
    a, b = overlap.clips[0], overlap.clips[1]
    assert b.start == pytest.approx(1.0) and (a.frames[8:] == b.frames[:9]).all()
    assert np.array_equal(a.audio[16000:], b.audio[:18000])
    gap = decoded("flipping_a_pancake.mkv", stride_frames=24, height=32, width=32)
    assert len(gap.clips) == (83 - 17) // 24 + 1 and gap.clips[1].start == pytest.approx(3.0)
    assert (gap.clips[1].frames[:9] == overlap.clips[3].frames[:9]).all()  # frame 24 starts both
    limited = decoded("flipping_a_pancake.mkv", stride_frames=8, height=32, width=32, max_clips=2)
    assert len(limited.clips) == 2 and limited.ok


@needs_corpus
def test_video_only_decode_when_audio_is_off():
    result = decoded("chaplin.mp4", audio=False, height=64, width=64)
    assert len(result.clips) == 4 and all(c.audio is None for c in result.clips)


@needs_corpus
def test_streaming_yields_before_the_end_and_cleans_up():
    clips = iter_clips(str(CORPUS / "smpte-2997.mp4"), MediaConfig(height=32, width=32))
    first = next(clips)
    assert first.index == 0
    clips.close()  # kills ffmpeg; no hang, no leaked process


@needs_corpus
def test_file_uri():
    result = decode("file://" + str(CORPUS / "fire2.mp4"), MediaConfig(height=32, width=32))
    assert len(result.clips) == 1 and result.clips[0].source.startswith("file://")


# ---------------------------------------------------------------------------------------------------- synthetic

def test_write_decode_round_trip(tmp_path):
    frames, audio = synthetic(4.25)
    path = tmp_path / "round.mp4"
    write_video(str(path), frames, 8.0, audio)
    result = decode(str(path), MediaConfig(height=48, width=64))
    assert result.ok and result.info.video_codec == "h264" and result.info.audio_codec == "aac"
    assert len(result.clips) == 2
    ours = np.concatenate([c.frames for c in result.clips])
    assert ours.shape == frames.shape and mae(ours, frames) < 4
    sound = np.concatenate([c.audio for c in result.clips])
    assert sound.shape == audio.shape and np.corrcoef(sound, audio)[0, 1] > 0.99


def test_write_odd_size_and_silent_video(tmp_path):
    frames, _ = synthetic(2.125, size=(31, 45))
    path = tmp_path / "odd.mp4"
    write_video(str(path), frames, 8.0)
    result = decode(str(path), MediaConfig(height=32, width=46))
    assert result.ok and result.info.has_audio is False and (result.info.width, result.info.height) == (46, 32)
    (clip,) = result.clips
    assert clip.audio is None and mae(clip.frames[:, :31, :45], frames) < 4


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="frames must be uint8"):
        write_video(str(tmp_path / "a.mp4"), np.zeros((2, 8, 8, 3), np.float32), 8.0)
    with pytest.raises(ValueError, match="audio must be mono"):
        write_video(str(tmp_path / "a.mp4"), np.zeros((2, 8, 8, 3), np.uint8), 8.0, np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_video(str(tmp_path / "a.mp4"), np.zeros((2, 8, 8, 3), np.uint8), 0.0)


def test_dash_and_colon_file_names_are_not_options_or_protocols(tmp_path, monkeypatch):
    frames, audio = synthetic(2.125)
    monkeypatch.chdir(tmp_path)
    for name in ("-x.mp4", "a:b.mp4"):
        write_video(name, frames, 8.0, audio)
        result = decode(name, MediaConfig(height=48, width=64))
        assert result.ok and len(result.clips) == 1 and result.clips[0].source == name


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_is_a_one_frame_clip(tmp_path, ext):
    frames, _ = synthetic(0.125, size=(60, 80))
    path = tmp_path / f"still.{ext}"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "80x60", "-i", "pipe:",
                    "-frames:v", "1", "-q:v", "2", str(path)], input=frames[0].tobytes(), check=True)
    result = decode(str(path), MediaConfig(height=30, width=40))
    assert result.ok and result.info.is_image
    (clip,) = result.clips
    assert clip.frames.shape == (1, 30, 40, 3) and clip.audio is None and clip.padded_frames == 0
    assert mae(clip.frames[0], cover_crop(frames[:1], 30, 40)[0]) < 6


def test_late_audio_is_padded_with_silence_without_deadlock(tmp_path):
    """Audio that starts 4 s in: ffmpeg must push 32 video frames (1.5 MB) before any audio arrives."""
    path = tmp_path / "late.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=128x128:rate=8:duration=6",
                    "-itsoffset", "4", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=2",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(path)], check=True)
    result = decode(str(path), MediaConfig(timeout_s=20))
    assert result.ok and len(result.clips) == 2
    first, second = result.clips
    assert np.abs(first.audio).max() < 1e-3
    assert np.abs(second.audio[:29000]).max() < 1e-3  # until 3.94 s
    assert np.abs(second.audio[31000:]).max() > 0.1  # from 4.06 s


def test_hang_is_killed_by_the_timeout(tmp_path):
    frames, _ = synthetic(24.0, size=(64, 64))
    source = tmp_path / "src.mkv"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x64", "-r", "8",
                    "-i", "pipe:", "-c:v", "libx264", "-preset", "ultrafast", "-g", "8", str(source)],
                   input=frames.tobytes(), check=True)
    data = source.read_bytes()
    fifo = tmp_path / "stalled.mkv"
    os.mkfifo(fifo)
    done = threading.Event()

    def feed():
        # Half the file (~12 s), then nothing, with the pipe held open.
        try:
            with open(fifo, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                done.wait(20)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        # Video only: one ffmpeg process opens the fifo once.
        result = decode(str(fifo), MediaConfig(height=32, width=32, audio=False, timeout_s=1.0))
    finally:
        done.set()
        writer.join(5)
    assert isinstance(result.error, DecodeTimeout) and result.error.kind == "timeout"
    assert "stalled.mkv" in str(result.error)
    assert 2 <= len(result.clips) <= 5  # ffmpeg reads up to 5 s ahead to find the stream parameters


def test_fifo_without_writer_times_out_at_open(tmp_path):
    fifo = tmp_path / "nobody.mp4"
    os.mkfifo(fifo)
    with pytest.raises(DecodeTimeout, match="did not open"):
        list(iter_clips(str(fifo), MediaConfig(timeout_s=0.5)))
    with pytest.raises(DecodeTimeout):
        media.probe(str(fifo), timeout_s=0.5)


def test_config_is_validated_and_loadable(tmp_path):
    from pipeline.config import load_config

    cfg_file = tmp_path / "media.toml"
    cfg_file.write_text('height = 224\nwidth = 128\nshort = "skip"\n')
    cfg = load_config(MediaConfig, str(cfg_file), ["stride_frames=8"])
    assert (cfg.height, cfg.width, cfg.short, cfg.stride_frames) == (224, 128, "skip", 8)
    assert MediaConfig().clip_samples == 34000 and MediaConfig().start_sample(3) == 3 * 34000
    with pytest.raises(ValueError, match="stride_frames"):
        MediaConfig(stride_frames=0)
    with pytest.raises(ValueError, match="short"):
        MediaConfig(short="crop")


def test_clip_id_is_source_and_index():
    clip = Clip("s3://b/v.mp4", 3, 6.375, 8.5, np.zeros((17, 2, 2, 3), np.uint8), None)
    assert clip.id == "s3://b/v.mp4#3"


def test_s3_uri_is_copied_locally(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    pafs = pytest.importorskip("pyarrow.fs")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    frames, audio = synthetic(2.125)
    write_video(str(tmp_path / "v.mp4"), frames, 8.0, audio)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"127.0.0.1:{server._server.server_port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{endpoint}")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True)
        fs.create_dir("media")
        with fs.open_output_stream("media/v.mp4") as f:
            f.write((tmp_path / "v.mp4").read_bytes())
        with fs.open_output_stream("media/empty.mp4") as f:
            f.write(b"")
        result = decode("s3://media/v.mp4", MediaConfig(height=48, width=64))
        assert result.ok and len(result.clips) == 1 and result.clips[0].source == "s3://media/v.mp4"
        assert isinstance(decode("s3://media/empty.mp4").error, EmptyFile)
        assert isinstance(decode("s3://media/gone.mp4").error, MissingFile)
        # A URI may not point the client elsewhere (the endpoint comes from the environment), nor leak what it carries.
        refused = decode(f"s3://media/v.mp4?endpoint_override={endpoint}&scheme=http&secret_key=hunter2").error
        assert refused.kind == "unsafe_uri" and "endpoint_override" in str(refused) and "hunter2" not in str(refused)
        too_big = decode("s3://media/v.mp4", MediaConfig(max_download_bytes=1000)).error
        assert too_big.kind == "too_large" and "max_download_bytes" in str(too_big)
    finally:
        server.stop()


def test_decode_audio_of_audio_only_and_silent_files():
    from pipeline.ffmpeg import NoAudioStream
    from pipeline.media import decode_audio

    wav = CORPUS / "example.wav"
    if not wav.exists():
        pytest.skip(f"{wav} not present")
    audio = decode_audio(wav, 16000)
    assert audio.dtype == np.float32 and abs(len(audio) / 16000 - 2.0) < 0.05 and np.abs(audio).max() > 0.01
    assert len(decode_audio(CORPUS / "crunching.mp3", 16000, seconds=1.0)) == 16000
    with pytest.raises(NoAudioStream, match="example.mp4"):
        decode_audio(CORPUS / "example.mp4")
