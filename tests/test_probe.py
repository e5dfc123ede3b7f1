"""Probing media headers (real corpus and files made by real ffmpeg) and the `videopoet probe` command."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import probe as probe_mod
from pipeline.ffmpeg import EmptyFile, MissingFile, NotMedia, NoVideoStream, ffmpeg_exe, ffprobe_exe
from pipeline.media import MediaConfig, decode, iter_clips
from pipeline.probe import main, probe

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"real media corpus not found at {CORPUS}")

# The facts SOURCES.md and the container headers state:
# file: (format, duration, (width, height) displayed, rotation, fps, video codec, audio codec, rate, channels)
FACTS = {
    "chaplin.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 9.64, (640, 360), 0, 25, "h264", "mp3", 44100, 2),
    "corrupted.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 5.0, (1280, 720), 0, 10, "h264", None, None, None),
    "crunching.mp3": ("mp3", 8.31, None, 0, None, None, "mp3", 48000, 2),
    "example.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 16.0, (640, 480), 0, 25, "h264", None, None, None),
    "example.wav": ("wav", 2.0, None, 0, None, None, "pcm_s16le", 44100, 2),
    "fire2.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 2.38, (1280, 720), 180, 10.51, "h264", "aac", 48000, 1),
    "flipping_a_pancake.mkv": ("matroska,webm", 10.38, (426, 240), 0, 30, "h264", "opus", 48000, 1),
    "no_duration.webm": ("matroska,webm", 4.94, (1280, 720), 0, 14.99, "vp9", "opus", 48000, 2),
    "smpte-2997.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 10.05, (1920, 1080), 0, 25, "h264", "aac", 48000, 2),
    "transparent.webm": ("matroska,webm", 5.0, (200, 200), 0, 30, "vp9", "vorbis", 48000, 2),
    "video_90.mov": ("mov,mp4,m4a,3gp,3g2,mj2", 0.1, (320, 568), 90, 30, "h264", None, None, None),
    "video_with_failing_audio.mp4": ("mov,mp4,m4a,3gp,3g2,mj2", 11.23, (640, 360), 0, 25, "h264", "mp3", 44100, 2),
}


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


@needs_corpus
@pytest.mark.parametrize("name", sorted(FACTS))
def test_probe_reports_the_known_facts(name):
    fmt, duration, size, rotation, fps, vcodec, acodec, rate, channels = FACTS[name]
    info = probe(str(CORPUS / name))
    assert info.path == str(CORPUS / name) and info.format == fmt
    assert info.duration == pytest.approx(duration, abs=0.01)
    assert info.has_video == (size is not None) and info.has_audio == (acodec is not None)
    assert (None if size is None else (info.width, info.height)) == size
    assert info.rotation == rotation and info.video_codec == vcodec and info.audio_codec == acodec
    assert (info.fps == pytest.approx(fps)) if fps else info.fps is None
    assert (info.audio_sample_rate, info.audio_channels) == (rate, channels)
    assert not info.is_image


@needs_corpus
def test_rotation_keeps_the_coded_size():
    info = probe(str(CORPUS / "video_90.mov"))
    assert (info.coded_width, info.coded_height) == (568, 320) and (info.width, info.height) == (320, 568)


@needs_corpus
def test_missing_duration_is_read_from_the_packets():
    path = CORPUS / "no_duration.webm"
    dump = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    assert "Duration: N/A" in dump  # the header really has none
    # Reference: decode every video frame and take the end of the last one.
    shown = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:v", "-vf", "showinfo", "-f",
                            "null", "-"], capture_output=True, text=True).stderr
    last = [line for line in shown.splitlines() if "pts_time:" in line][-1]
    end = sum(float(re.search(rf"{key}:([\d.]+)", last).group(1)) for key in ("pts_time", "duration_time"))
    assert probe(str(path)).duration == pytest.approx(end, abs=0.01)


@needs_corpus
def test_alpha_flags():
    assert probe(str(CORPUS / "transparent.webm")).has_alpha
    assert not probe(str(CORPUS / "chaplin.mp4")).has_alpha


@needs_corpus
def test_typed_errors():
    with pytest.raises(EmptyFile) as e:
        probe(str(CORPUS / "result.webm"))
    assert e.value.kind == "empty" and e.value.path.endswith("result.webm")
    with pytest.raises(NotMedia) as e:
        probe(str(CORPUS / "captions.jsonl"))
    assert e.value.kind == "not_media" and "Invalid data" in e.value.message
    with pytest.raises(MissingFile):
        probe(str(CORPUS / "absent.mkv"))


def test_anamorphic_surround_and_cover_art(tmp_path):
    wide = tmp_path / "wide.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8:duration=1", "-f", "lavfi", "-i",
           "sine=frequency=300:sample_rate=22050:duration=1", "-vf", "setsar=2/1", "-ac", "6", "-c:v", "libx264",
           "-preset", "ultrafast", "-c:a", "flac", str(wide))
    info = probe(str(wide))
    assert (info.coded_width, info.coded_height, info.width, info.height) == (64, 48, 128, 48)
    assert (info.audio_sample_rate, info.audio_channels, info.audio_codec) == (22050, 6, "flac")
    # The display aspect survives into the clips: a centred 64x48 crop of the 128x48 picture, not a squeeze.
    (clip,) = decode(str(wide), MediaConfig(height=48, width=64, clip_frames=8, stride_frames=8)).clips
    reference = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(wide), "-vf", "scale=128:48,crop=64:48",
                                "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"],
                               capture_output=True, check=True).stdout
    reference = np.frombuffer(reference, np.uint8).reshape(48, 64, 3)
    assert np.abs(clip.frames[0].astype(int) - reference).mean() < 3

    cover = tmp_path / "cover.png"
    song = tmp_path / "song.mp3"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=32x32", "-frames:v", "1", str(cover))
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-i", str(cover), "-map", "0", "-map", "1", "-c:v", "png",
           "-disposition:v", "attached_pic", str(song))
    info = probe(str(song))
    assert not info.has_video and info.has_audio
    assert [(s.kind, s.attached_pic) for s in info.streams] == [("audio", False), ("video", True)]
    with pytest.raises(NoVideoStream):
        next(iter_clips(str(song)))

    still = probe(str(cover))
    assert still.is_image and (still.width, still.height) == (32, 32) and still.duration is None


def test_dump_parser_agrees_with_ffprobe_when_installed():
    if ffprobe_exe() is None:
        pytest.skip("ffprobe is not on PATH (imageio-ffmpeg ships only ffmpeg); the ffmpeg -i parser is in use")
    for path in sorted(CORPUS.glob("*.m*")):
        via_ffprobe = probe(str(path))
        dump = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
        via_dump = probe_mod.parse_ffmpeg_dump(str(path), dump)
        for field in ("has_video", "has_audio", "width", "height", "rotation", "video_codec", "audio_codec",
                      "audio_sample_rate", "audio_channels"):
            assert getattr(via_dump, field) == getattr(via_ffprobe, field), (path.name, field)


@needs_corpus
def test_cli_prints_one_json_object_per_file(capsys):
    assert main([str(CORPUS / "video_90.mov"), str(CORPUS / "chaplin.mp4")]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == [str(CORPUS / "video_90.mov"), str(CORPUS / "chaplin.mp4")]
    assert records[0]["rotation"] == 90 and (records[0]["width"], records[0]["height"]) == (320, 568)
    assert records[1]["duration"] == pytest.approx(9.64) and records[1]["fps"] == 25
    assert [s["kind"] for s in records[1]["streams"]] == ["video", "audio"]


@needs_corpus
def test_cli_reports_failures_and_exits_1(capsys):
    files = [str(CORPUS / "fire2.mp4"), str(CORPUS / "result.webm"), str(CORPUS / "missing.mp4")]
    assert main(files) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "error" not in records[0] and records[0]["rotation"] == 180
    assert records[1] == {"path": files[1], "error": {"kind": "empty", "message": "file is empty (0 bytes)"}}
    assert records[2]["error"]["kind"] == "missing"
