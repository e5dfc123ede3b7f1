"""The ffmpeg plumbing that probing and decoding share: the binaries, typed media errors, input URLs, running a
subprocess with a timeout, and local copies of remote URIs.

`ffmpeg` is the one on PATH, else the binary the `imageio-ffmpeg` wheel ships; `ffprobe` only when it is on PATH
(the wheel has none, so `pipeline.probe` then parses the stream dump of `ffmpeg -i`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
import tempfile
from typing import Iterator

from pipeline.storage import is_uri, resolve_filesystem


# ---------------------------------------------------------------------------------------------------- errors

class MediaError(Exception):
    """A media file that cannot be (fully) decoded. `kind` is a short machine-readable label for error tables."""

    kind = "media"

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
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
def local_file(path: str) -> Iterator[str]:
    """A local, seekable path for `path`. Non-local URIs (s3://, gs://, hdfs://) are copied to a temporary file
    through pyarrow's filesystems first, because ffmpeg must seek in MP4 files."""
    import pyarrow.fs

    path = str(path)
    if not is_uri(path):
        check_local(path, path)
        yield path
        return
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
    suffix = os.path.splitext(inner)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix, prefix="videopoet-") as tmp:
        with fs.open_input_stream(inner) as src:
            shutil.copyfileobj(src, tmp, length=1 << 20)
        tmp.flush()
        yield tmp.name
