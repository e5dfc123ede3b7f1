"""Decode any file ffmpeg reads into fixed-size audio-visual clips, and write frames back to MP4.

One ffmpeg process per file streams raw RGB frames through stdout and mono float32 audio through a second pipe;
threads drain audio and stderr so neither pipe can fill up and stall the other. Clips are yielded as soon as their
frames (and audio) have arrived. ffmpeg resamples to `fps` with the fps filter (variable frame rates included),
autorotates by the display matrix, scales to cover `height` x `width` and center-crops. Clip `i` covers output
frames `[i * stride_frames, i * stride_frames + clip_frames)` and the audio samples of the same time window, both
timed from the start of the file.

Damage part-way: ffmpeg runs with `-xerror`, so the first error a decoder returns stops it with a non-zero exit
code. The clips completed before that point are yielded, then `CorruptMedia` is raised (`iter_clips`) or stored in
`DecodeResult.error` (`decode`). Errors a decoder conceals by itself only print a message and do not count.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import os
import select
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import ffmpeg
import numpy as np

from pipeline.probe import (CorruptMedia, DecodeTimeout, EmptyFile, MediaError, MediaInfo, MissingFile,
                            NoVideoStream, NotMedia, TooShort, ffmpeg_exe, ffmpeg_url, local_file, probe,
                            probe_local)

__all__ = [
    "MediaConfig", "Clip", "DecodeResult", "iter_clips", "decode", "decode_command", "write_video", "probe",
    "MediaInfo", "MediaError", "MissingFile", "EmptyFile", "NotMedia", "NoVideoStream", "CorruptMedia",
    "DecodeTimeout", "TooShort", "ffmpeg_exe",
]

_GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-v", "error")


# ---------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class MediaConfig:
    fps: float = 8.0
    height: int = 128  # portrait clips of the paper's 128x224 stage: height = 224, width = 128
    width: int = 128
    clip_frames: int = 17
    stride_frames: int = 17  # frames between clip starts: < clip_frames overlaps, > clip_frames leaves gaps
    sample_rate: int = 16000
    audio: bool = True
    short: Literal["pad", "skip"] = "pad"  # a file shorter than one clip: repeat its last frame, or TooShort
    timeout_s: float = 60.0  # longest wait for any output of ffmpeg before it counts as hung
    max_clips: int = 0  # 0 = no limit

    def __post_init__(self):
        for name in ("fps", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MediaConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("height", "width", "clip_frames", "stride_frames", "sample_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"MediaConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_clips < 0:
            raise ValueError(f"MediaConfig.max_clips must be >= 0 (0 = no limit), got {self.max_clips!r}")
        if self.short not in ("pad", "skip"):
            raise ValueError(f"MediaConfig.short must be 'pad' or 'skip', got {self.short!r}")

    @property
    def clip_samples(self) -> int:
        return round(self.clip_frames / self.fps * self.sample_rate)

    def start_sample(self, index: int) -> int:
        return round(index * self.stride_frames / self.fps * self.sample_rate)


# ---------------------------------------------------------------------------------------------------- results

@dataclass(frozen=True, eq=False)
class Clip:
    source: str  # the path or URI as given
    index: int  # position in the file: with `source`, a stable clip id
    start: float  # seconds
    end: float
    frames: np.ndarray  # uint8 (T, H, W, 3)
    audio: Optional[np.ndarray]  # float32 (clip_frames / fps * sample_rate,), None for a file without audio
    padded_frames: int = 0  # trailing frames that repeat the last real one (a file shorter than a clip)

    @property
    def id(self) -> str:
        return f"{self.source}#{self.index}"


@dataclass(frozen=True, eq=False)
class DecodeResult:
    info: Optional[MediaInfo]  # None when the file could not even be probed
    clips: list[Clip]
    error: Optional[MediaError]  # the clips are those decoded before it

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------------------- ffmpeg

@functools.cache
def _has_decoder(name: str) -> bool:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-decoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines())


def _cover_size(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int]:
    """The smallest scaled size of the source (aspect kept) that covers the target, for a center crop."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))


def _input(local: str, info: MediaInfo) -> ffmpeg.nodes.FilterableStream:
    # The probe already has the frame rate and the fps filter ignores it: skip decoding frames to estimate it.
    options = {"fpsprobesize": 0}
    # ffmpeg's native VP8/VP9 decoders ignore the alpha side channel; libvpx decodes it.
    libvpx = {"vp8": "libvpx", "vp9": "libvpx-vp9"}.get(info.video_codec or "")
    if info.has_alpha and libvpx and _has_decoder(libvpx):
        options["c:v"] = libvpx
    return ffmpeg.input(ffmpeg_url(local), **options)


def _video_output(inp, info: MediaInfo, cfg: MediaConfig, target: str):
    stream = inp[str(info.video_index)]
    options = {"f": "rawvideo", "pix_fmt": "rgb24"}
    if info.is_image:
        options["frames:v"] = 1
    else:
        stream = stream.filter("fps", fps=cfg.fps, start_time=0)
    if info.has_alpha:
        # Composite over black: premultiplied colour with alpha dropped.
        stream = stream.filter("format", "rgba").filter("premultiply", inplace=1)
    scaled_w, scaled_h = _cover_size(info.width, info.height, cfg.width, cfg.height)
    stream = stream.filter("scale", scaled_w, scaled_h).filter("crop", cfg.width, cfg.height)
    return stream.output(target, **options)


def _audio_output(inp, info: MediaInfo, cfg: MediaConfig, target: str):
    # first_pts=0 pads (or trims) the start so sample 0 is at time 0 of the file, like the video frames.
    stream = inp[str(info.audio_index)].filter(
        "aresample", osr=cfg.sample_rate, ochl="mono", osf="flt", first_pts=0, **{"async": 1})
    return stream.output(target, f="f32le")


def decode_command(local: str, info: MediaInfo, cfg: MediaConfig, audio_fd: Optional[int] = None) -> list[str]:
    """The ffmpeg command line: video to stdout, and audio to file descriptor `audio_fd` when given."""
    inp = _input(local, info)
    outputs = [_video_output(inp, info, cfg, "pipe:1")]
    if audio_fd is not None:
        outputs.append(_audio_output(inp, info, cfg, f"pipe:{audio_fd}"))
    compiled = ffmpeg.merge_outputs(*outputs).compile(cmd=ffmpeg_exe())
    return [compiled[0], *_GLOBAL_ARGS, "-xerror", *compiled[1:]]


class _Stalled(Exception):
    pass


def _widen_pipe(fd: int) -> None:
    """Let ffmpeg run ~20 frames ahead of the reader instead of one (64 KiB is the Linux default)."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size for unprivileged users
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


class _AudioBuffer:
    """Mono float32 samples filled by a reader thread; the decoder takes windows and drops what it has used."""

    def __init__(self):
        self._data = bytearray()
        self._offset = 0  # samples dropped from the front
        self._eof = False
        self._cond = threading.Condition()

    def fill(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                with self._cond:
                    self._data += chunk
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _available(self) -> int:
        return self._offset + len(self._data) // 4

    def ready(self, end: int) -> bool:
        """Whether waiting for samples up to `end` would return at once."""
        with self._cond:
            return self._eof or self._available() >= end

    def wait(self, end: int, timeout_s: float) -> bool:
        """Wait for samples up to `end` or the end of the stream; True if all of them came."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._eof or self._available() >= end, timeout=timeout_s):
                raise _Stalled
            return self._available() >= end

    def take(self, start: int, count: int) -> np.ndarray:
        """Samples [start, start + count), zeros past the end of the stream; drops everything before `start`."""
        with self._cond:
            drop = max(0, start - self._offset)
            del self._data[:drop * 4]
            self._offset += drop
            usable = min(count, max(0, self._available() - start))
            out = np.zeros(count, np.float32)
            out[:usable] = np.frombuffer(self._data, np.float32, count=usable)
            return out


class _Process:
    """A running decode: frames are read on the caller's thread, audio and stderr on their own threads."""

    def __init__(self, local: str, info: MediaInfo, cfg: MediaConfig, with_audio: bool):
        self.timeout_s = cfg.timeout_s
        self.audio = _AudioBuffer() if with_audio else None
        self.stderr: collections.deque[str] = collections.deque(maxlen=20)
        audio_r, audio_w = os.pipe() if with_audio else (-1, -1)
        try:
            self.proc = subprocess.Popen(
                decode_command(local, info, cfg, audio_w if with_audio else None), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, pass_fds=(audio_w,) if with_audio else ())
        except BaseException:
            if with_audio:
                os.close(audio_r)
            raise
        finally:
            if with_audio:
                os.close(audio_w)  # ffmpeg holds the write end now; ours would hide its EOF
        _widen_pipe(self.proc.stdout.fileno())
        self.threads = [threading.Thread(target=self._drain_stderr, daemon=True)]
        if with_audio:
            self.threads.append(threading.Thread(target=self.audio.fill, args=(audio_r,), daemon=True))
        for t in self.threads:
            t.start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())

    def read_into(self, buf: np.ndarray) -> bool:
        """Fill `buf` with the next frame; False at the end of the stream. Raises _Stalled on a hang."""
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
            if not ready:
                raise _Stalled
            n = self.proc.stdout.readinto(view[got:])
            if not n:
                return False
            got += n
        return True

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise _Stalled from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self.threads:
            t.join()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def last_error(self) -> str:
        lines = [line for line in self.stderr if line]
        return lines[-1] if lines else "no message"


class _Windows:
    """Cuts a stream of frames into clips of `length` frames starting every `stride` frames."""

    def __init__(self, length: int, stride: int):
        self.length, self.stride = length, stride
        self.frames: list[np.ndarray] = []  # kept frames, starting at output frame `next_start`
        self.next_start = 0
        self.count = 0  # frames seen
        self.index = 0  # clips cut

    def push(self, frame: np.ndarray) -> Optional[np.ndarray]:
        if self.count >= self.next_start:
            self.frames.append(frame)
        self.count += 1
        if len(self.frames) < self.length:
            return None
        window = np.stack(self.frames)
        self.index += 1
        self.next_start = self.index * self.stride
        self.frames = self.frames[self.stride:]
        return window


# ---------------------------------------------------------------------------------------------------- decoding

def _new_clip(source: str, index: int, frames: np.ndarray, cfg: MediaConfig, padded: int = 0) -> Clip:
    start = index * cfg.stride_frames / cfg.fps
    return Clip(source, index, start, start + len(frames) / cfg.fps, frames, None, padded)


def _stream_clips(local: str, source: str, info: MediaInfo, cfg: MediaConfig) -> Iterator[Clip]:
    if not info.has_video:
        raise NoVideoStream(source, f"no video stream (streams: {[s.kind for s in info.streams] or 'none'})")
    if not (info.width and info.height):
        raise CorruptMedia(source, f"video stream {info.video_index} ({info.video_codec}) has no frame size")
    limit = cfg.max_clips or float("inf")
    windows = _Windows(1 if info.is_image else cfg.clip_frames, cfg.stride_frames)
    proc = _Process(local, info, cfg, with_audio=cfg.audio and info.has_audio and not info.is_image)
    audio = proc.audio

    def audio_end(clip: Clip) -> int:
        return cfg.start_sample(clip.index) + cfg.clip_samples

    def finish(clip: Clip) -> Clip:
        if audio is None:
            return clip
        return dataclasses.replace(clip, audio=audio.take(cfg.start_sample(clip.index), cfg.clip_samples))

    pending: collections.deque[Clip] = collections.deque()  # clips whose audio has not all arrived
    emitted = 0
    try:
        while proc.read_into(frame := np.empty((cfg.height, cfg.width, 3), np.uint8)):
            window = windows.push(frame)
            if window is not None:
                pending.append(_new_clip(source, windows.index - 1, window, cfg))
            # Never block on audio here: ffmpeg may be stuck on a full video pipe while it still owes us audio.
            while pending and (audio is None or audio.ready(audio_end(pending[0]))):
                yield finish(pending.popleft())
                emitted += 1
                if emitted >= limit:
                    return
        returncode = proc.wait()
        error = None
        if returncode != 0:
            error = CorruptMedia(source, f"ffmpeg stopped (exit code {returncode}) after {windows.count} frames "
                                         f"({windows.count / cfg.fps:.2f} s at {cfg.fps:g} fps): {proc.last_error()}")
        for clip in pending:
            # After a failure the audio may have stopped early too: keep only clips with all of theirs.
            if audio is not None and not audio.wait(audio_end(clip), cfg.timeout_s) and error is not None:
                break
            yield finish(clip)
            emitted += 1
            if emitted >= limit:
                return
        if error is not None:
            raise error
        if windows.index == 0:
            if windows.count == 0:
                raise CorruptMedia(source, f"ffmpeg decoded no frames: {proc.last_error()}")
            if cfg.short == "skip":
                raise TooShort(source, f"{windows.count} frames at {cfg.fps:g} fps, shorter than one clip of "
                                       f"{windows.length} (short='skip')")
            missing = windows.length - windows.count
            clip = _new_clip(source, 0, np.stack([*windows.frames, *[windows.frames[-1]] * missing]), cfg, missing)
            if audio is not None:
                audio.wait(audio_end(clip), cfg.timeout_s)
            yield finish(clip)
    except _Stalled:
        raise DecodeTimeout(source, f"ffmpeg produced nothing for {cfg.timeout_s:g} s after {windows.count} frames; "
                                    "killed it") from None
    finally:
        proc.close()


def iter_clips(path: str, cfg: MediaConfig = MediaConfig()) -> Iterator[Clip]:
    """Stream the clips of one file or URI as they are decoded. A `MediaError` is raised after the clips that were
    decoded before it (a file damaged part-way), or at once when the file cannot be read at all."""
    path = str(path)
    with local_file(path) as local:
        info = probe_local(local, path, cfg.timeout_s)
        yield from _stream_clips(local, path, info, cfg)


def decode(path: str, cfg: MediaConfig = MediaConfig()) -> DecodeResult:
    """All clips of one file, with the error that ended decoding (if any) instead of raising it."""
    path = str(path)
    info: Optional[MediaInfo] = None
    clips: list[Clip] = []
    try:
        with local_file(path) as local:
            info = probe_local(local, path, cfg.timeout_s)
            clips.extend(_stream_clips(local, path, info, cfg))
    except MediaError as e:
        return DecodeResult(info, clips, e)
    return DecodeResult(info, clips, None)


# ---------------------------------------------------------------------------------------------------- writing

def write_video(path: str, frames: np.ndarray, fps: float, audio: Optional[np.ndarray] = None,
                sample_rate: int = 16000) -> None:
    """Write uint8 frames (T, H, W, 3) as MP4 (H.264 yuv420p), with mono float32 audio as AAC when given.

    yuv420p needs even sizes: an odd height or width is padded by repeating the last row or column.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"write_video {path}: frames must be uint8 (T, H, W, 3) with T >= 1, "
                         f"got {frames.dtype} {frames.shape}")
    if not fps > 0:
        raise ValueError(f"write_video {path}: fps must be > 0, got {fps!r}")
    if audio is not None:
        audio = np.asarray(audio)
        if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
            raise ValueError(f"write_video {path}: audio must be mono float (samples,), got {audio.dtype} "
                             f"{audio.shape}")
        audio = np.ascontiguousarray(audio, np.float32)
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    _, height, width, _ = frames.shape

    video_in = ffmpeg.input("pipe:0", f="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", r=fps)
    streams = [video_in.video]
    audio_r = audio_w = None
    if audio is not None:
        audio_r, audio_w = os.pipe()
        streams.append(ffmpeg.input(f"pipe:{audio_r}", f="f32le", ar=sample_rate, ac=1).audio)
    options = {"f": "mp4", "vcodec": "libx264", "pix_fmt": "yuv420p", "preset": "veryfast", "crf": 18,
               "movflags": "+faststart"}
    if audio is not None:
        options.update(acodec="aac", **{"b:a": "128k"})
    compiled = ffmpeg.output(*streams, ffmpeg_url(path), **options).compile(cmd=ffmpeg_exe())
    cmd = [compiled[0], *_GLOBAL_ARGS, "-y", *compiled[1:]]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            pass_fds=(audio_r,) if audio is not None else ())
    writer = None
    if audio is not None:
        os.close(audio_r)
        writer = threading.Thread(target=_write_all, args=(audio_w, audio.tobytes()), daemon=True)
        writer.start()
    stderr = b""
    try:
        stderr = _communicate(proc, np.ascontiguousarray(frames).tobytes())
    finally:
        if writer is not None:
            writer.join()
    if proc.returncode != 0:
        raise OSError(f"write_video {path}: ffmpeg failed ({proc.returncode}): "
                      f"{stderr.decode(errors='replace').strip()}")


def _write_all(fd: int, data: bytes) -> None:
    with open(fd, "wb") as pipe:
        try:
            pipe.write(data)
        except BrokenPipeError:
            pass  # ffmpeg failed early; its exit code tells why


def _communicate(proc: subprocess.Popen, data: bytes) -> bytes:
    try:
        _, stderr = proc.communicate(data)
    except BrokenPipeError:
        stderr = proc.stderr.read()
        proc.wait()
    return stderr
