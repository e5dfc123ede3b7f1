"""What a media file holds, read from its header without decoding it.

`ffprobe` is used when it is on PATH. The `imageio-ffmpeg` wheel ships only an `ffmpeg` binary, so the fallback
parses the stream dump that `ffmpeg -i FILE` prints (the same text ffprobe prints to stderr).

Sizes: `width`/`height` are the display size (sample aspect ratio applied, then rotation), which is what the
decoder's frames are shaped like because ffmpeg autorotates; `coded_width`/`coded_height` are the stored size.
`rotation` is the clockwise rotation in degrees (0, 90, 180, 270) that turns a stored frame upright.

Header values are data: a number that does not parse or is not finite (a `rotate` tag of `abc` or `nan`, a frame
rate of `25/0`) reads as absent, and any other failure on one file is that file's typed error (`InternalError`).
ffmpeg reads inputs under `pipeline.ffmpeg.input_args`: media demuxers only, local files only.

    videopoet probe FILE...    one JSON object per file; exit code 1 if any file failed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from pipeline.ffmpeg import (MAX_PIXELS, InternalError, MediaError, NotMedia, ffmpeg_exe, ffmpeg_url, ffprobe_exe,
                             input_args, last_line, local_file, refusal, run)


# ---------------------------------------------------------------------------------------------------- info

@dataclass(frozen=True)
class StreamInfo:
    index: int
    kind: str  # video | audio | subtitle | data | attachment
    codec: str
    width: Optional[int] = None  # coded size
    height: Optional[int] = None
    pix_fmt: Optional[str] = None
    fps: Optional[float] = None
    sar: Optional[tuple[int, int]] = None
    rotation: int = 0
    alpha: bool = False
    attached_pic: bool = False  # cover art: a picture, not a video
    sample_rate: Optional[int] = None
    channels: Optional[int] = None


@dataclass(frozen=True)
class MediaInfo:
    path: str
    format: str
    duration: Optional[float]  # seconds; None when neither the header nor a demux pass gives it
    streams: tuple[StreamInfo, ...]
    has_video: bool
    has_audio: bool
    is_image: bool
    width: Optional[int]  # display size: sample aspect ratio and rotation applied
    height: Optional[int]
    coded_width: Optional[int]
    coded_height: Optional[int]
    fps: Optional[float]
    rotation: int
    has_alpha: bool
    video_codec: Optional[str]
    audio_codec: Optional[str]
    audio_sample_rate: Optional[int]
    audio_channels: Optional[int]
    video_index: Optional[int]  # the stream ffmpeg should map (`0:<index>`)
    audio_index: Optional[int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_IMAGE_FORMATS = ("image2", "apng")  # single pictures also come as `<codec>_pipe` (png_pipe, jpeg_pipe, ...)


def _summarize(path: str, fmt: str, duration: Optional[float], streams: list[StreamInfo]) -> MediaInfo:
    video = next((s for s in streams if s.kind == "video" and not s.attached_pic), None)
    audio = next((s for s in streams if s.kind == "audio"), None)
    width = height = None
    if video is not None and video.width and video.height:
        sar = video.sar if video.sar and video.sar[0] > 0 and video.sar[1] > 0 else (1, 1)
        width, height = round(video.width * sar[0] / sar[1]), video.height
        if video.rotation in (90, 270):
            width, height = height, width
    return MediaInfo(
        path=path, format=fmt, duration=duration, streams=tuple(streams),
        has_video=video is not None, has_audio=audio is not None,
        is_image=video is not None and (fmt in _IMAGE_FORMATS or fmt.endswith("_pipe")),
        width=width, height=height,
        coded_width=video.width if video else None, coded_height=video.height if video else None,
        fps=video.fps if video else None, rotation=video.rotation if video else 0,
        has_alpha=bool(video and video.alpha),
        video_codec=video.codec if video else None, audio_codec=audio.codec if audio else None,
        audio_sample_rate=audio.sample_rate if audio else None, audio_channels=audio.channels if audio else None,
        video_index=video.index if video else None, audio_index=audio.index if audio else None,
    )


def _has_alpha(pix_fmt: Optional[str], alpha_mode: Optional[str]) -> bool:
    # VP8/VP9 keep alpha in a side channel flagged by the `alpha_mode` tag; other codecs in their pixel format.
    if alpha_mode == "1":
        return True
    return bool(pix_fmt) and (pix_fmt.startswith(("yuva", "rgba", "bgra", "argb", "abgr", "gbrap", "ya"))
                              or pix_fmt == "pal8")


def _number(text: Any) -> Optional[float]:
    """A finite number, or None for anything else (`abc`, `nan`, `inf`, `1e999`, None)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _rotation_from(display_matrix_degrees: Optional[str], rotate_tag: Optional[str]) -> int:
    # The display matrix angle is counter-clockwise; the legacy `rotate` tag is clockwise.
    if (angle := _number(display_matrix_degrees)) is not None:
        return int(round(-angle)) % 360
    if (angle := _number(rotate_tag)) is not None:
        return int(round(angle)) % 360
    return 0


def _fraction(text: Optional[str]) -> Optional[float]:
    num, _, den = (text or "").partition("/")
    num, den = _number(num), _number(den or 1)
    return num / den if num and den else None


# ---------------------------------------------------------------------------------------------------- ffprobe

def _parse_ffprobe(path: str, data: dict[str, Any]) -> MediaInfo:
    streams = []
    for s in data.get("streams", []):
        tags = s.get("tags", {})
        matrix = next((d.get("rotation") for d in s.get("side_data_list", [])
                       if d.get("side_data_type") == "Display Matrix"), None)
        sar = s.get("sample_aspect_ratio", "")
        streams.append(StreamInfo(
            index=int(s["index"]), kind=s.get("codec_type", "data"), codec=s.get("codec_name", "unknown"),
            width=s.get("width"), height=s.get("height"), pix_fmt=s.get("pix_fmt"),
            fps=_fraction(s.get("avg_frame_rate")) or _fraction(s.get("r_frame_rate")),
            sar=tuple(int(x) for x in sar.split(":")) if re.fullmatch(r"\d+:\d+", sar) else None,
            rotation=_rotation_from(matrix, tags.get("rotate")),
            alpha=_has_alpha(s.get("pix_fmt"), tags.get("alpha_mode") or tags.get("ALPHA_MODE")),
            attached_pic=bool(s.get("disposition", {}).get("attached_pic")),
            sample_rate=int(s["sample_rate"]) if s.get("sample_rate") else None, channels=s.get("channels"),
        ))
    fmt = data.get("format", {})
    return _summarize(path, fmt.get("format_name", "unknown"), _number(fmt.get("duration")), streams)


def _run_ffprobe(local: str, source: str, timeout_s: float, options: Sequence[str]) -> MediaInfo:
    cmd = [ffprobe_exe(), "-v", "error", "-print_format", "json", "-show_format", "-show_streams", *options,
           ffmpeg_url(local)]
    proc = run(cmd, source, timeout_s)
    data = json.loads(proc.stdout or "{}")
    if proc.returncode != 0 or "format" not in data:
        raise (refusal(local, source, options, proc.stderr.splitlines())
               or NotMedia(source, last_line(proc.stderr) or "ffprobe found no media"))
    return _parse_ffprobe(source, data)


# ---------------------------------------------------------------------------------------------------- ffmpeg -i

_INPUT = re.compile(r"^Input #0, (.+), from '")
_DURATION = re.compile(r"^\s+Duration: (N/A|(\d+):(\d\d):(\d\d(?:\.\d+)?))")
_STREAM = re.compile(r"^\s+Stream #0:(\d+)(?:\[0x[0-9a-f]+\])?(?:\([^)]*\))?: (\w+): (.*)$")
_ROTATION = re.compile(r"rotation of (\S+) degrees")
_TAG = re.compile(r"^\s+(\w+)\s*: (.*)$")
_LAYOUT_CHANNELS = {"mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8}


def _split_top(text: str) -> list[str]:
    """Split at commas outside parentheses and brackets: `yuv420p(tv, bt709), 640x360` -> 2 parts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _channels(layout: str) -> Optional[int]:
    layout = layout.split("(")[0].strip()
    if m := re.fullmatch(r"(\d+) channels", layout):
        return int(m.group(1))
    if m := re.fullmatch(r"(\d+)\.(\d+)", layout):
        return int(m.group(1)) + int(m.group(2))
    return _LAYOUT_CHANNELS.get(layout)


def _parse_stream_line(index: int, kind: str, spec: str, matrix: Optional[str], tags: dict[str, str]) -> StreamInfo:
    parts = _split_top(spec)
    fields: dict[str, Any] = {"index": index, "kind": kind.lower(), "codec": parts[0].split()[0],
                              "attached_pic": "(attached pic)" in spec}
    if fields["kind"] == "video":
        fields["pix_fmt"] = parts[1].split("(")[0].strip() if len(parts) > 1 else None
        for part in parts[1:]:
            if m := re.match(r"^(\d+)x(\d+)", part):
                fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
            if (m := re.match(r"^([\d.]+)(k?) (fps|tbr)", part)) and (rate := _number(m.group(1))):
                fields.setdefault("fps", rate * (1000 if m.group(2) else 1))  # fps comes before tbr: prefer it
        if m := re.search(r"SAR (\d+):(\d+)", spec):
            fields["sar"] = (int(m.group(1)), int(m.group(2)))
        fields["rotation"] = _rotation_from(matrix, tags.get("rotate"))
        fields["alpha"] = _has_alpha(fields["pix_fmt"], tags.get("alpha_mode") or tags.get("ALPHA_MODE"))
    elif fields["kind"] == "audio":
        for i, part in enumerate(parts):
            if m := re.fullmatch(r"(\d+) Hz", part):
                fields["sample_rate"] = int(m.group(1))
                fields["channels"] = _channels(parts[i + 1]) if i + 1 < len(parts) else None
    return StreamInfo(**fields)


def parse_ffmpeg_dump(path: str, text: str) -> Optional[MediaInfo]:
    """Parse the `Input #0` dump of `ffmpeg -i`; None when ffmpeg could not open the input."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _INPUT.match(line)), None)
    if start is None:
        return None
    fmt = _INPUT.match(lines[start]).group(1)
    duration: Optional[float] = None
    raw: list[list[Any]] = []  # [index, kind, spec, display matrix angle, tags] per stream
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        if m := _DURATION.match(line):
            if m.group(1) != "N/A":
                duration = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
        elif m := _STREAM.match(line):
            raw.append([int(m.group(1)), m.group(2), m.group(3), None, {}])
        elif raw and (m := _ROTATION.search(line)):
            raw[-1][3] = m.group(1)
        elif raw and (m := _TAG.match(line)):
            raw[-1][4].setdefault(m.group(1), m.group(2).strip())
    streams = [_parse_stream_line(*r) for r in raw]
    return _summarize(path, fmt, duration, streams)


def _run_ffmpeg_dump(local: str, source: str, timeout_s: float, options: Sequence[str]) -> MediaInfo:
    proc = run([ffmpeg_exe(), "-hide_banner", "-nostdin", *options, "-i", ffmpeg_url(local)], source, timeout_s)
    refused = refusal(local, source, options, proc.stderr.splitlines())
    if refused is not None:
        raise refused
    info = parse_ffmpeg_dump(source, proc.stderr)
    if info is None:
        raise NotMedia(source, last_line(proc.stderr) or "ffmpeg cannot read it")
    return info


# ---------------------------------------------------------------------------------------------------- probe

def _demuxed_duration(local: str, source: str, timeout_s: float, options: Sequence[str]) -> Optional[float]:
    """The end time of the last packet, read by copying packets to the null muxer: no decoding, one read."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *options, "-i", ffmpeg_url(local), "-map", "0",
           "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    out = run(cmd, source, timeout_s).stdout
    times = re.findall(r"^out_time_us=(\d+)$", out, flags=re.M)
    return int(times[-1]) / 1e6 if times and int(times[-1]) > 0 else None


def with_duration(info: MediaInfo, local: str, timeout_s: float = 60.0,
                  options: Sequence[str] = tuple(input_args())) -> MediaInfo:
    """`info` with the duration read from the packets when the header has none (not for pictures or pipes);
    `options` are the input options ffmpeg read it with (`pipeline.ffmpeg.input_args`)."""
    if info.duration is not None or info.is_image or not os.path.isfile(local):
        return info
    return dataclasses.replace(info, duration=_demuxed_duration(local, info.path, timeout_s, options))


def probe(path: str, timeout_s: float = 60.0, allow_formats: Sequence[str] = (),
          max_pixels: int = MAX_PIXELS) -> MediaInfo:
    """Streams, duration, size, frame rate and rotation of a media file or URI, without decoding it. Media
    demuxers only, plus `allow_formats`; frames above `max_pixels` are not decoded (TooLarge)."""
    path = str(path)
    options = input_args(allow_formats, max_pixels)
    try:
        with local_file(path) as local:
            info = (_run_ffprobe if ffprobe_exe() else _run_ffmpeg_dump)(local, path, timeout_s, options)
            return with_duration(info, local, timeout_s, options)
    except MediaError:
        raise
    except Exception as e:  # whatever else broke on this file is this file's error
        raise InternalError.of(path, e) from e


# ---------------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="videopoet probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="media files or URIs")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per file")
    parser.add_argument("--allow-format", dest="allow_formats", action="append", default=[], metavar="DEMUXER",
                        help="also let ffmpeg use this demuxer (e.g. hls: playlists open the files they name)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="most pixels of a decoded frame")
    args = parser.parse_args(argv)
    if not args.timeout > 0 or args.max_pixels < 1:  # an argument's error, not each file's (exit code 2, not 1)
        parser.error(f"--timeout must be > 0 and --max-pixels >= 1, got {args.timeout} and {args.max_pixels}")
    failed = 0
    for path in args.files:
        try:
            record = probe(path, args.timeout, args.allow_formats, args.max_pixels).to_dict()
        except MediaError as e:
            failed += 1
            record = {"path": path, "error": {"kind": e.kind, "message": e.message}}
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
