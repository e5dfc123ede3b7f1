"""A corpus of small crafted files that each attack the decoder one way, made with the project's own ffmpeg.

`build(root)` writes the files under root/corpus, and root/elsewhere/secret.{ts,mp4}: files outside the corpus that
playlists and scripts in it name, and that must never be decoded. `EXPECTED` says what each input must become: the
number of clips (with debug tokenize settings: 32x32, at most 2 clips) or the error kind.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from pipeline.ffmpeg import ffmpeg_exe

# name -> (clips, error kind, truncated) with the debug tokenize flavor (max_clips = 2, max_pixels = 4K UHD)
EXPECTED: dict[str, tuple[int, str | None, bool]] = {
    "rotate_abc.nut": (1, None, False),  # non-numeric `rotate` tag: read as no rotation
    "rotate_nan.nut": (1, None, False),
    "rotate_inf.nut": (1, None, False),
    "gap_600s.mkv": (2, None, True),  # two frames 600 s apart: the fps filter fills 4,800 frames; 2 clips kept
    "tall_2x16000.mkv": (1, None, False),  # cropped to 4x the target's aspect before scaling
    "wide_16000x2.mkv": (1, None, False),
    "huge_4000x4000.mkv": (0, "too_large", False),  # above max_pixels: refused before a frame is decoded
    "playlist.m3u8": (0, "refused_format", False),  # hls naming ../elsewhere/secret.ts
    "playlist_named.mp4": (0, "not_media", False),  # the same playlist under a video's name
    "script.ffconcat": (0, "refused_format", False),  # concat script naming ../elsewhere/secret.mp4
    "ansi_art.ans": (0, "refused_format", False),  # text that the tty demuxer would render as video
    "img%03d.png": (0, "refused_format", False),  # an image2 pattern: img001.png... beside it
    "truncated_faststart.mp4": (1, "corrupt", False),  # cut mid-stream: the clip before the damage is kept
    "truncated_moov_at_end.mp4": (0, "not_media", False),  # cut before its index
    "matroska_named.mp4": (1, None, False),  # a wrong extension is no problem
    "archive_named.mp4": (0, "not_media", False),  # a zip file
    "blip_40ms.wav": (0, "no_video", False),  # audio only, shorter than one frame
    "picture.png": (1, None, False),  # an image: one padded clip
    "spaces in name.mp4": (1, None, False),
    "vidéo ü 視頻.mp4": (1, None, False),
    "it's \"quoted\".mp4": (1, None, False),
    "$(touch pwned).mp4": (1, None, False),  # no shell ever sees a name
    "audio_runs_5min_past_video.mp4": (1, None, False),  # one frame, five minutes of sound: the buffer is capped
}


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


def _clip(path: Path, seconds: float = 1.0, size: str = "64x48") -> None:
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate=8:duration={seconds}", "-c:v", "libx264", "-preset",
           "ultrafast", "-pix_fmt", "yuv420p", str(path))


def build(root: Path) -> Path:
    """Write the crafted corpus; returns its folder."""
    corpus, elsewhere = root / "corpus", root / "elsewhere"
    corpus.mkdir(parents=True)
    elsewhere.mkdir()
    _clip(elsewhere / "secret.mp4")
    ffmpeg("-i", str(elsewhere / "secret.mp4"), "-c", "copy", "-f", "mpegts", str(elsewhere / "secret.ts"))
    for name, value in (("abc", "abc"), ("nan", "nan"), ("inf", "inf")):
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8:duration=1", "-c:v", "mpeg4",
               "-metadata:s:v:0", f"rotate={value}", str(corpus / f"rotate_{name}.nut"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8", "-frames:v", "2", "-vf",
           "setpts='if(eq(N,1),600/TB,PTS)'", "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast",
           str(corpus / "gap_600s.mkv"))
    for name, size in (("tall_2x16000", "2x16000"), ("wide_16000x2", "16000x2"), ("huge_4000x4000", "4000x4000")):
        ffmpeg("-f", "lavfi", "-i", f"color=c=red:size={size}:rate=8:duration=0.25", "-c:v", "png",
               str(corpus / f"{name}.mkv"))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{elsewhere / 'secret.ts'}\n#EXT-X-ENDLIST\n"
    (corpus / "playlist.m3u8").write_text(playlist)
    (corpus / "playlist_named.mp4").write_text(playlist)
    (corpus / "script.ffconcat").write_text("ffconcat version 1.0\nfile ../elsewhere/secret.mp4\n")
    (corpus / "ansi_art.ans").write_text("\x1b[31mred text\x1b[0m and more text\n" * 40)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(corpus / "picture.png"))
    for i in (1, 2, 3):
        (corpus / f"img{i:03d}.png").write_bytes((corpus / "picture.png").read_bytes())
    (corpus / "img%03d.png").write_bytes((corpus / "picture.png").read_bytes())
    _clip(root / "whole.mp4", seconds=6.0)
    ffmpeg("-i", str(root / "whole.mp4"), "-c", "copy", "-movflags", "+faststart", str(root / "faststart.mp4"))
    data = (root / "faststart.mp4").read_bytes()
    (corpus / "truncated_faststart.mp4").write_bytes(data[: len(data) * 3 // 5])
    (corpus / "truncated_moov_at_end.mp4").write_bytes((root / "whole.mp4").read_bytes()[:2000])
    _clip(root / "m.mkv")
    (corpus / "matroska_named.mp4").write_bytes((root / "m.mkv").read_bytes())
    with zipfile.ZipFile(corpus / "archive_named.mp4", "w") as archive:
        archive.writestr("inside.txt", "not a video " * 100)
    ffmpeg("-f", "lavfi", "-i", "sine=duration=0.04", str(corpus / "blip_40ms.wav"))
    for name in ("spaces in name.mp4", "vidéo ü 視頻.mp4", "it's \"quoted\".mp4", "$(touch pwned).mp4"):
        _clip(corpus / name)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8:duration=0.125", "-f", "lavfi", "-i",
           "sine=duration=300", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
           str(corpus / "audio_runs_5min_past_video.mp4"))
    return corpus
