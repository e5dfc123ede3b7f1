"""The ffmpeg plumbing that probing and decoding share: the binaries, typed media errors, input URLs and options,
running a subprocess with a timeout, and local copies of remote URIs.

`ffmpeg` is the one on PATH, else the binary the `imageio-ffmpeg` wheel ships; `ffprobe` only when it is on PATH
(the wheel has none, so `pipeline.probe` then parses the stream dump of `ffmpeg -i`).

Inputs are data, not instructions: every ffmpeg that reads one gets `input_args`, which restrict it to the media
demuxers of MEDIA_DEMUXERS reading local files (no playlist, concat script, ANSI-art text, image-name pattern or
network description that makes ffmpeg open other files or hosts) and cap the pixels of a decoded frame.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import subprocess
import tempfile
from typing import Iterator, Sequence

from pipeline.storage import UnsafeUri, check_uri, is_uri, redact, resolve_filesystem

# Demuxers of media files: containers, elementary streams, audio formats, animations, and single pictures (one
# `<codec>_pipe` demuxer per picture format). Left out on purpose: hls, dash, webm_dash_manifest, imf, concat,
# dvdvideo (they open other files named inside the input), image2 (expands `%d` and glob patterns in the name),
# tty, bin, xbin, adf, idf (text shown as video), sdp, rtp, rtsp, sap (network sessions), avisynth (scripts),
# svg_pipe (SVG may reference other files). `media.allow_formats` adds to the list.
MEDIA_DEMUXERS = (
    "mov", "mp4", "matroska", "webm", "avi", "flv", "live_flv", "asf", "mpegts", "mpeg", "mxf", "nut", "ogg", "rm",
    "dv", "ivf", "obu", "yuv4mpegpipe", "wtv", "nsv", "gxf", "smjpeg",
    "h264", "hevc", "vvc", "av1", "m4v", "mpegvideo", "mjpeg", "vc1", "h263", "h261", "dirac", "cavsvideo",
    "wav", "w64", "aiff", "caf", "mp3", "aac", "ac3", "eac3", "flac", "wv", "ape", "amr", "au", "dts", "dtshd",
    "truehd", "mlp", "tta", "tak", "mpc", "mpc8", "oma", "loas", "sox", "voc", "xwma", "dsf", "iamf", "qoa",
    "gif", "apng", "webp_anim", "jpegxl_anim",
    "png_pipe", "jpeg_pipe", "jpegls_pipe", "jpegxl_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe",
    "dpx_pipe", "exr_pipe", "j2k_pipe", "pam_pipe", "pbm_pipe", "pgm_pipe", "ppm_pipe", "pcx_pipe", "psd_pipe",
    "qoi_pipe", "sgi_pipe", "sunrast_pipe", "xwd_pipe", "dds_pipe", "hdr_pipe", "pfm_pipe", "phm_pipe",
)
DEMUXER_NAME = re.compile(r"^[a-z0-9_]+$")
MAX_PIXELS = 7680 * 4320  # 8K UHD
_REFUSED = "Format not on whitelist"
_PIXELS = "exceeds specified max pixel count"
LIMIT_MESSAGES = (_REFUSED, _PIXELS)  # what ffmpeg prints when `input_args` stop it
_PROBED = re.compile(r"Format (\S+) probed with size")


# ---------------------------------------------------------------------------------------------------- errors

class MediaError(Exception):
    """A media file that cannot be (fully) decoded. `kind` is a short machine-readable label for error tables."""

    kind = "media"

    def __init__(self, path: str, message: str):
        super().__init__(f"{redact(path)}: {message}")
        self.path = str(path)
        self.message = message


class MissingFile(MediaError):
    kind = "missing"


class EmptyFile(MediaError):
    kind = "empty"


class NotMedia(MediaError):
    kind = "not_media"


class NoVideoStream(MediaError):
    kind = "no_video"


class NoAudioStream(MediaError):
    kind = "no_audio"


class CorruptMedia(MediaError):
    kind = "corrupt"


class DecodeTimeout(MediaError):
    kind = "timeout"


class TooShort(MediaError):
    kind = "too_short"


class TooLarge(MediaError):
    """Frames above `media.max_pixels`, or a remote input above `media.max_download_bytes`."""

    kind = "too_large"


class RefusedFormat(MediaError):
    """A demuxer outside MEDIA_DEMUXERS and `media.allow_formats` (a playlist, a script, ...)."""

    kind = "refused_format"


class UnsafeInput(MediaError):
    """A URI whose query parameters would configure the filesystem client (`pipeline.storage.check_uri`)."""

    kind = "unsafe_uri"


class DeadlineExceeded(MediaError):
    """Decoding one input took longer than `media.deadline_s` in all; the clips before it are kept."""

    kind = "deadline"


class AudioOverrun(MediaError):
    """The audio ran further ahead of the video than `media.audio_buffer_s`; the clips before it are kept."""

    kind = "audio_overrun"


class ReadError(MediaError):
    """The input could not be read or copied (an I/O error of the filesystem)."""

    kind = "io_error"


class InternalError(MediaError):
    """Any other failure while probing or decoding one input, with the exception's type and message."""

    kind = "internal"

    @classmethod
    def of(cls, path: str, error: Exception) -> "InternalError":
        return cls(path, f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------------- binaries

@functools.cache
def ffmpeg_exe() -> str:
    """The ffmpeg binary: the one on PATH, else the one bundled with imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.cache
def ffprobe_exe() -> str | None:
    return shutil.which("ffprobe")


def ffmpeg_url(path: str) -> str:
    """A local path as an ffmpeg input/output URL that is never read as an option (`-x.mp4`) or a protocol (`a:b`)."""
    return "file:" + os.path.abspath(path)


def input_args(allow_formats: Sequence[str] = (), max_pixels: int = MAX_PIXELS) -> list[str]:
    """Options that go before an input's `-i`: media demuxers only (plus `allow_formats`), local files only, and at
    most `max_pixels` pixels per decoded frame."""
    return ["-protocol_whitelist", "file", "-format_whitelist", ",".join((*MEDIA_DEMUXERS, *allow_formats)),
            "-max_pixels", str(max_pixels)]


def refusal(local: str, source: str, options: Sequence[str], lines: Sequence[str]) -> MediaError | None:
    """The typed error for an ffmpeg run with `options` (`input_args`) that printed `lines` (its error lines) when
    those options stopped it, else None. A refused format is named by a second look at debug level, which probes
    the input without opening it."""
    if pixels := next((line for line in lines if _PIXELS in line), None):
        detail = pixels.split("] ")[-1].split(", see")[0].strip()
        return TooLarge(source, f"{detail} (media.max_pixels)")
    if not any(_REFUSED in line for line in lines):
        return None
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "debug", *options, "-i", ffmpeg_url(local)]
    found = _PROBED.search(run(cmd, source, 30.0).stderr)
    # No probe line: the demuxer was picked from the name alone, which only image2 does (a `%d` pattern).
    name = found.group(1) if found else "image2"
    return RefusedFormat(source, f"format {name!r} is not a media demuxer that ffmpeg may use on data (playlists, "
                                 "concat scripts, image-name patterns and the like make it open other files); to "
                                 f"decode it anyway: media.allow_formats = [\"{name.split(',')[0]}\"]")


# ---------------------------------------------------------------------------------------------------- processes

def run(cmd: list[str], source: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `cmd` to completion with text output; a process that outlives `timeout_s` is killed (DecodeTimeout)."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DecodeTimeout(source, f"{os.path.basename(cmd[0])} gave no answer within {timeout_s:g} s") from None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------------- inputs

def check_local(path: str, source: str) -> None:
    """Raise the typed error for a local path that does not exist or is an empty regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MissingFile(source, "no such file") from None
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise EmptyFile(source, "file is empty (0 bytes)")


@contextlib.contextmanager
def local_file(path: str, max_bytes: int | None = None) -> Iterator[str]:
    """A local, seekable path for `path`. Non-local URIs (s3://, gs://, hdfs://) are copied to a temporary file
    through pyarrow's filesystems first, because ffmpeg must seek in MP4 files; at most `max_bytes` of them."""
    import pyarrow.fs

    path = str(path)
    if not is_uri(path):
        check_local(path, path)
        yield path
        return
    try:
        check_uri(path)
    except UnsafeUri as e:
        raise UnsafeInput(path, e.reason) from None
    try:
        fs, inner = resolve_filesystem(path)
        info = fs.get_file_info(inner)
    except (OSError, ValueError) as e:
        raise NotMedia(path, f"cannot open URI: {e}") from None
    if isinstance(fs, pyarrow.fs.LocalFileSystem):  # file:// URIs
        check_local(inner, path)
        yield inner
        return
    if info.type == pyarrow.fs.FileType.NotFound:
        raise MissingFile(path, "no such object")
    if info.size == 0:
        raise EmptyFile(path, "object is empty (0 bytes)")
    if max_bytes and info.size is not None and info.size > max_bytes:
        raise TooLarge(path, f"{info.size} bytes, above media.max_download_bytes = {max_bytes}")
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(inner)[1], prefix="videopoet-") as tmp:
        try:
            _copy(fs.open_input_stream(inner), tmp, path, max_bytes)
        except OSError as e:
            raise ReadError(path, f"copying it failed: {e}") from None
        yield tmp.name


def _copy(src, dst, source: str, max_bytes: int | None) -> None:
    """Copy a stream to a file, counting: a store's listing may understate what it then sends."""
    copied = 0
    with src:
        while chunk := src.read(1 << 20):
            copied += len(chunk)
            if max_bytes and copied > max_bytes:
                raise TooLarge(source, f"more than media.max_download_bytes = {max_bytes} bytes")
            dst.write(chunk)
    dst.flush()
