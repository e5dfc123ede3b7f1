"""Decode any file ffmpeg reads into fixed-size audio-visual clips, and write frames back to MP4.

One ffmpeg process per file streams raw RGB frames through stdout and mono float32 audio through a second pipe;
threads drain audio and stderr so neither pipe can fill up and stall the other. Clips are yielded as soon as their
frames (and audio) have arrived. ffmpeg resamples to `fps` with the fps filter (variable frame rates included),
autorotates by the display matrix, scales to cover `height` x `width` and center-crops. Clip `i` covers output
frames `[i * stride_frames, i * stride_frames + clip_frames)` and the audio samples of the same time window, both
timed from the start of the file.

No separate probe: the command assumes a video with audio, and the stream dump ffmpeg prints before decoding
(parsed like `probe`'s) says whether it was right. When it was not (no audio, VP8/VP9 alpha that needs libvpx, a
still image), ffmpeg is started again knowing; a probe process would cost as much for every file.

Damage part-way: ffmpeg runs with `-xerror`, so the first error a decoder returns stops it with a non-zero exit
code. The clips completed before that point are yielded, then `CorruptMedia` is raised (`iter_clips`) or stored in
`DecodeResult.error` (`decode`). Errors a decoder conceals by itself only print a message and do not count.

Bounded work per input, whatever the file says: at most `max_clips` clips (the first ones; `truncated` says when
there were more), `deadline_s` seconds in all besides the `timeout_s` of silence, frames of at most `max_pixels`
pixels, a picture cropped to at most MAX_ASPECT times the target's aspect ratio before it is scaled (a 2x16000
video would otherwise scale to a 128x1,024,000 frame), at most `audio_buffer_s` of audio ahead of the video, and at
most `max_download_bytes` copied from a remote input. Only media demuxers may read an input (`pipeline.ffmpeg`).
Any failure on one input, whatever its type, becomes that input's typed `MediaError` (`Decoding`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import os
import re
import select
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import ffmpeg
import numpy as np

from pipeline.ffmpeg import (DEMUXER_NAME, LIMIT_MESSAGES, MAX_PIXELS, AudioOverrun, CorruptMedia, DeadlineExceeded,
                             DecodeTimeout, EmptyFile, InternalError, MediaError, MissingFile, NoAudioStream,
                             NoVideoStream, NotMedia, TooLarge, TooShort, ffmpeg_exe, ffmpeg_url, input_args,
                             local_file, refusal)
from pipeline.probe import MediaInfo, parse_ffmpeg_dump, probe, with_duration

__all__ = [
    "MediaConfig", "Clip", "DecodeResult", "Decoding", "iter_clips", "decode", "decode_audio", "decode_command",
    "write_video", "probe",
    "MediaInfo", "MediaError", "MissingFile", "EmptyFile", "NotMedia", "NoVideoStream", "CorruptMedia",
    "DecodeTimeout", "TooShort", "ffmpeg_exe",
]

MAX_ASPECT = 4.0  # a picture wider or taller than this many times the target's aspect ratio is center-cropped first
# Fields that bound or permit the work on an input but never change the pixels or samples of a clip it gives.
LIMIT_FIELDS = ("timeout_s", "deadline_s", "max_pixels", "max_download_bytes", "audio_buffer_s", "allow_formats")


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
    max_clips: int = 256  # clips per input, the first ones (256 = 9 minutes at 8 fps); 0 = no limit
    deadline_s: float = 600.0  # wall-clock seconds per input in all: copy, probe and decode
    max_pixels: int = MAX_PIXELS  # pixels of a decoded source frame (8K UHD)
    max_download_bytes: int = 8 << 30  # bytes copied from a remote input before decoding
    audio_buffer_s: float = 60.0  # seconds of decoded audio held ahead of the video
    allow_formats: tuple[str, ...] = ()  # ffmpeg demuxers allowed beyond the media ones, e.g. ["hls"]

    def __post_init__(self):
        for name in ("fps", "timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MediaConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("height", "width", "clip_frames", "stride_frames", "sample_rate", "max_pixels",
                     "max_download_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"MediaConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_clips < 0:
            raise ValueError(f"MediaConfig.max_clips must be >= 0 (0 = no limit), got {self.max_clips!r}")
        if self.short not in ("pad", "skip"):
            raise ValueError(f"MediaConfig.short must be 'pad' or 'skip', got {self.short!r}")
        if not self.audio_buffer_s >= self.clip_frames / self.fps:
            raise ValueError(f"MediaConfig.audio_buffer_s must hold one clip's audio (>= clip_frames / fps = "
                             f"{self.clip_frames / self.fps:g} s), got {self.audio_buffer_s!r}")
        for name in self.allow_formats:
            if not DEMUXER_NAME.match(name):
                raise ValueError(f"MediaConfig.allow_formats: {name!r} is not an ffmpeg demuxer name "
                                 "(`ffmpeg -demuxers` lists them, e.g. 'hls')")

    @property
    def clip_samples(self) -> int:
        return round(self.clip_frames / self.fps * self.sample_rate)

    def start_sample(self, index: int) -> int:
        return round(index * self.stride_frames / self.fps * self.sample_rate)

    def input_args(self) -> list[str]:
        return input_args(self.allow_formats, self.max_pixels)


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
    truncated: bool = False  # max_clips stopped decoding: the input had more clips than these

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------------------- ffmpeg

@dataclass(frozen=True)
class _Plan:
    """What the command line must know about a file, and the first guess: a plain video, with audio if wanted."""

    audio: bool
    image: bool = False
    alpha: bool = False
    decoder: Optional[str] = None  # forced video decoder


@functools.cache
def _has_decoder(name: str) -> bool:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-decoders"], capture_output=True, text=True).stdout
    return any(line.split()[1:2] == [name] for line in out.splitlines())


def _plan_for(info: MediaInfo, cfg: MediaConfig) -> _Plan:
    # ffmpeg's native VP8/VP9 decoders ignore the alpha side channel; libvpx decodes it.
    libvpx = {"vp8": "libvpx", "vp9": "libvpx-vp9"}.get(info.video_codec or "")
    decoder = libvpx if info.has_alpha and libvpx and _has_decoder(libvpx) else None
    return _Plan(audio=cfg.audio and info.has_audio and not info.is_image, image=info.is_image,
                 alpha=info.has_alpha, decoder=decoder)


def _video_output(inp, cfg: MediaConfig, image: bool, alpha: bool, target: str):
    stream = inp["V:0"]  # the first video stream that is not cover art
    options = {"f": "rawvideo", "pix_fmt": "rgb24"}
    if image:
        options["frames:v"] = 1
    else:
        stream = stream.filter("fps", fps=cfg.fps, start_time=0)
    if alpha:
        stream = stream.filter("format", "rgba").filter("premultiply", inplace=1)  # over black, alpha dropped
    # Cover the target keeping the display aspect (iw * sar; autorotation has already turned the frame), then crop
    # the centre. The expressions spare a probe before the process starts. The first crop, a no-op for any usual
    # shape, keeps the scaled frame within MAX_ASPECT times the target's size.
    w, h = cfg.width, cfg.height
    wide, tall = MAX_ASPECT * w / h, MAX_ASPECT * h / w
    stream = stream.filter("crop", w=f"min(iw,ih*{wide:g}/sar)", h=f"min(ih,iw*sar*{tall:g})")
    scale = f"max({w}/(iw*sar),{h}/ih)"
    stream = stream.filter("scale", w=f"max({w},round(iw*sar*{scale}))", h=f"max({h},round(ih*{scale}))")
    return stream.filter("crop", w, h).output(target, **options)


def _audio_output(inp, cfg: MediaConfig, target: str):
    # first_pts=0 pads (or trims) the start so sample 0 is at time 0 of the file, like the video frames.
    stream = inp["a:0"].filter("aresample", osr=cfg.sample_rate, ochl="mono", osf="flt", first_pts=0,
                               **{"async": 1})
    return stream.output(target, f="f32le")


def _options(args: list[str]) -> dict[str, str]:
    """`-key value` pairs as ffmpeg-python's input keywords."""
    return {key.lstrip("-"): value for key, value in zip(args[::2], args[1::2])}


def decode_command(local: str, cfg: MediaConfig, audio_fd: Optional[int] = None, image: bool = False,
                   alpha: bool = False, decoder: Optional[str] = None) -> list[str]:
    """The ffmpeg command line: frames to stdout and, given `audio_fd`, audio to that file descriptor."""
    limits = cfg.input_args()
    inp = ffmpeg.input(ffmpeg_url(local), **_options(limits),
                       **({"c:v": decoder} if decoder else {}))
    outputs = [_video_output(inp, cfg, image, alpha, "pipe:1")]
    if audio_fd is not None:
        outputs.append(_audio_output(inp, cfg, f"pipe:{audio_fd}"))
    compiled = ffmpeg.merge_outputs(*outputs).compile(cmd=ffmpeg_exe())
    # Info level for the stream dump, each line tagged with its level to tell errors apart.
    return [compiled[0], "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+info", "-xerror",
            *compiled[1:]]


class _OutOfTime(Exception):
    """A wait ran out: ffmpeg was silent for `timeout_s`, or the input's `deadline_s` passed."""


class _Overrun(Exception):
    """Audio that a clip needs was dropped because it came more than `audio_buffer_s` ahead of the video."""


class _Clock:
    """The two time limits of one input: silence (`timeout_s`) and the whole input (`deadline_s`)."""

    def __init__(self, cfg: MediaConfig):
        self.timeout_s = cfg.timeout_s
        self.deadline = time.monotonic() + cfg.deadline_s

    def wait_s(self) -> float:
        """How long the next wait may last."""
        return max(0.0, min(self.timeout_s, self.deadline - time.monotonic()))

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def check(self) -> None:
        if self.expired():
            raise _OutOfTime


def _widen_pipe(fd: int) -> None:
    """Let ffmpeg run ~20 frames ahead of the reader instead of one (64 KiB is the Linux default)."""
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size for unprivileged users
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


class _AudioBuffer:
    """Mono float32 samples filled by a reader thread; the decoder takes windows and drops what it has used.

    The reader never blocks ffmpeg: past `limit` samples held it stops keeping what arrives (and keeps reading, so
    ffmpeg can finish the video), and a later request for a dropped sample raises _Overrun."""

    def __init__(self, limit: int):
        self._data = bytearray()
        self._offset = 0  # samples dropped from the front
        self._limit = limit
        self._overrun = False  # samples were dropped at the back: nothing more is kept
        self._eof = False
        self._cond = threading.Condition()

    def fill(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                with self._cond:
                    if not self._overrun:
                        room = 4 * self._limit - len(self._data)
                        self._data += chunk[:room]
                        self._overrun = len(chunk) > room
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _available(self) -> int:
        return self._offset + len(self._data) // 4

    def _done(self, end: int) -> bool:
        if self._available() >= end:
            return True
        if self._overrun:
            raise _Overrun
        return self._eof

    def ready(self, end: int) -> bool:
        """Whether waiting for samples up to `end` would return at once."""
        with self._cond:
            return self._done(end)

    def wait(self, end: int, clock: _Clock) -> bool:
        """Wait for samples up to `end` or the end of the stream; True if all of them came."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done(end), timeout=clock.wait_s()):
                raise _OutOfTime
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


_LEVEL = re.compile(r"\[(info|warning|error|fatal|panic)\] ")  # from `-loglevel level+info`


class _Process:
    """A running decode: frames are read on the caller's thread, audio and stderr on their own threads."""

    def __init__(self, local: str, cfg: MediaConfig, plan: _Plan, clock: _Clock):
        self.plan = plan
        self.clock = clock
        self.audio = _AudioBuffer(round(cfg.audio_buffer_s * cfg.sample_rate)) if plan.audio else None
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self.refusals: list[str] = []  # what ffmpeg said about `input_args` (a refused format, too many pixels)
        self._dump: list[str] = []  # the `Input #0` block of stderr
        self._dumped = threading.Event()
        audio_r, audio_w = os.pipe() if plan.audio else (-1, -1)
        cmd = decode_command(local, cfg, audio_w if plan.audio else None, plan.image, plan.alpha, plan.decoder)
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, pass_fds=(audio_w,) if plan.audio else ())
        except BaseException:
            if plan.audio:
                os.close(audio_r)
            raise
        finally:
            if plan.audio:
                os.close(audio_w)  # ffmpeg holds the write end now; ours would hide its EOF
        _widen_pipe(self.proc.stdout.fileno())
        self.threads = [threading.Thread(target=self._drain_stderr, daemon=True)]
        if plan.audio:
            self.threads.append(threading.Thread(target=self.audio.fill, args=(audio_r,), daemon=True))
        for t in self.threads:
            t.start()

    def _drain_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            level = _LEVEL.search(line)
            if level is None:
                continue
            text = line[:level.start()] + line[level.end():]
            if level.group(1) in ("error", "fatal", "panic"):
                self.errors.append(text)
                if any(message in text for message in LIMIT_MESSAGES):
                    self.refusals.append(text)
            if not self._dumped.is_set():
                if text.startswith("Input #0") or (self._dump and text.startswith(" ")):
                    self._dump.append(text)
                elif self._dump:
                    self._dumped.set()
        self._dumped.set()

    def info(self, source: str) -> Optional[MediaInfo]:
        """The stream dump ffmpeg prints once it has opened the input, parsed; None when stderr ended without one
        (ffmpeg could not open the input, and said why)."""
        if not self._dumped.wait(self.clock.wait_s()):
            raise _OutOfTime
        return parse_ffmpeg_dump(source, "\n".join(self._dump))

    def read_into(self, buf: np.ndarray) -> bool:
        """Fill `buf` with the next frame; False at the end of the stream. Raises _OutOfTime on a hang."""
        view = memoryview(buf).cast("B")
        got = 0
        while got < len(view):
            ready, _, _ = select.select([self.proc.stdout], [], [], self.clock.wait_s())
            if not ready:
                raise _OutOfTime
            n = self.proc.stdout.readinto(view[got:])
            if not n:
                return False
            got += n
        return True

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=self.clock.wait_s())
        except subprocess.TimeoutExpired:
            raise _OutOfTime from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self.threads:
            t.join()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def last_error(self) -> str:
        return self.errors[-1] if self.errors else f"ffmpeg exit code {self.proc.returncode}"


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


class _ClipStream:
    """The clips of one local file. `info` is set once ffmpeg has described the file (with the duration read from
    the packets when the header has none), before the first clip; `truncated` once `max_clips` stopped it."""

    def __init__(self, local: str, source: str, cfg: MediaConfig, clock: _Clock):
        self.local, self.source, self.cfg, self.clock = local, source, cfg, clock
        self.info: Optional[MediaInfo] = None
        self.truncated = False

    def _describe(self, proc: _Process) -> MediaInfo:
        """What ffmpeg says the file holds (kept in `info`), checked against what decoding needs before a frame."""
        info = self.info = proc.info(self.source)
        if info is None:
            raise (refusal(self.local, self.source, self.cfg.input_args(), proc.refusals)
                   or NotMedia(self.source, proc.last_error()))
        if not info.has_video:
            kinds = [s.kind for s in info.streams] or "none"
            raise NoVideoStream(self.source, f"no video stream (streams: {kinds})")
        pixels = (info.coded_width or 0) * (info.coded_height or 0)
        if pixels > self.cfg.max_pixels:
            raise TooLarge(self.source, f"frames of {info.coded_width}x{info.coded_height} = {pixels} pixels, above "
                                        f"media.max_pixels = {self.cfg.max_pixels}")
        return info

    def _start(self) -> _Process:
        plan = _Plan(audio=self.cfg.audio)
        while True:  # twice at most: the plan made from the dump does not change on a second look
            proc = _Process(self.local, self.cfg, plan, self.clock)
            try:
                plan = _plan_for(self._describe(proc), self.cfg)
            except BaseException:
                proc.close()
                raise
            if plan == proc.plan:
                break
            proc.close()  # the guess was wrong (no audio, alpha, a still image): start over, knowing
        if self.info.duration is None:
            try:
                self.clock.check()
                self.info = with_duration(self.info, self.local, self.clock.wait_s(), self.cfg.input_args())
            except BaseException:
                proc.close()
                raise
        return proc

    def _stopped(self, frames: int, opening: bool = False) -> MediaError:
        """The error for a wait that ran out, `frames` frames into the file."""
        cfg = self.cfg
        if self.clock.expired():
            return DeadlineExceeded(self.source, f"decoding took longer than media.deadline_s = {cfg.deadline_s:g} s "
                                                 f"in all ({frames} frames decoded); killed it")
        if opening:
            return DecodeTimeout(self.source, f"ffmpeg did not open the input within {cfg.timeout_s:g} s")
        return DecodeTimeout(self.source, f"ffmpeg produced nothing for {cfg.timeout_s:g} s after {frames} frames; "
                                          "killed it")

    def _failed(self, proc: _Process, returncode: int, frames: int) -> MediaError:
        refused = refusal(self.local, self.source, self.cfg.input_args(), proc.refusals)
        if refused is not None:
            return refused
        return CorruptMedia(self.source, f"ffmpeg stopped (exit code {returncode}) after {frames} frames "
                                         f"({frames / self.cfg.fps:.2f} s at {self.cfg.fps:g} fps): "
                                         f"{proc.last_error()}")

    def __iter__(self) -> Iterator[Clip]:
        cfg, source = self.cfg, self.source
        try:
            proc = self._start()
        except _OutOfTime:
            raise self._stopped(0, opening=True) from None
        limit = cfg.max_clips or None
        windows = _Windows(1 if proc.plan.image else cfg.clip_frames, cfg.stride_frames)
        audio = proc.audio

        def audio_end(clip: Clip) -> int:
            return cfg.start_sample(clip.index) + cfg.clip_samples

        def finish(clip: Clip) -> Clip:
            if audio is None:
                return clip
            return dataclasses.replace(clip, audio=audio.take(cfg.start_sample(clip.index), cfg.clip_samples))

        def next_frame() -> Optional[np.ndarray]:
            self.clock.check()
            frame = np.empty((cfg.height, cfg.width, 3), np.uint8)
            return frame if proc.read_into(frame) else None

        pending: collections.deque[Clip] = collections.deque()  # clips whose audio has not all arrived
        emitted = 0
        try:
            while (frame := next_frame()) is not None:
                window = windows.push(frame)
                if window is not None:
                    pending.append(_new_clip(source, windows.index - 1, window, cfg))
                # Never block on audio here: ffmpeg may be stuck on a full video pipe while it still owes us audio.
                while pending and (audio is None or audio.ready(audio_end(pending[0]))):
                    yield finish(pending.popleft())
                    emitted += 1
                    if emitted == limit:
                        self.truncated = bool(pending) or self._another_window(windows, next_frame)
                        return
            returncode = proc.wait()
            error = self._failed(proc, returncode, windows.count) if returncode != 0 else None
            while pending:
                clip = pending.popleft()
                # After a failure the audio may have stopped early too: keep only clips with all of theirs.
                if audio is not None and not audio.wait(audio_end(clip), self.clock) and error is not None:
                    break
                yield finish(clip)
                emitted += 1
                if emitted == limit:
                    self.truncated = bool(pending)
                    return
            if error is not None:
                raise error
            if windows.index == 0:
                yield self._short_clip(windows, audio, audio_end, finish, proc)
        except _OutOfTime:
            raise self._stopped(windows.count) from None
        except _Overrun:
            raise AudioOverrun(source, f"the audio ran more than media.audio_buffer_s = {cfg.audio_buffer_s:g} s "
                                       f"ahead of the video after {windows.count} frames") from None
        finally:
            proc.close()

    @staticmethod
    def _another_window(windows: _Windows, next_frame) -> bool:
        """Whether the file goes on for at least one more clip (read up to it, not decoded into one)."""
        while (frame := next_frame()) is not None:
            if windows.push(frame) is not None:
                return True
        return False

    def _short_clip(self, windows: _Windows, audio: Optional[_AudioBuffer], audio_end, finish,
                    proc: _Process) -> Clip:
        """The one clip of a file shorter than a clip: its last frame repeated (short='pad'), or TooShort."""
        cfg, source = self.cfg, self.source
        if windows.count == 0:
            raise CorruptMedia(source, f"ffmpeg decoded no frames: {proc.last_error()}")
        if cfg.short == "skip":
            raise TooShort(source, f"{windows.count} frames at {cfg.fps:g} fps, shorter than one clip of "
                                   f"{windows.length} (short='skip')")
        missing = windows.length - windows.count
        frames = np.stack([*windows.frames, *[windows.frames[-1]] * missing])
        clip = _new_clip(source, 0, frames, cfg, missing)
        if audio is not None:
            audio.wait(audio_end(clip), self.clock)
        return finish(clip)


class Decoding:
    """The clips of one file or URI, streamed as they are decoded; iterating never raises a decode failure.

    While iterating, `info` is what ffmpeg said about the file (set before the first clip). Afterwards `error` is
    what ended decoding early, if anything (the clips before it were yielded), and `truncated` whether `max_clips`
    stopped a file that had more. One rule: any failure of probing or decoding, whatever its type, becomes `error`
    as a typed `MediaError` (`InternalError` when no other kind fits), so a caller never loses its other inputs.
    """

    def __init__(self, path: str, cfg: MediaConfig = MediaConfig()):
        self.path, self.cfg = str(path), cfg
        self.error: Optional[MediaError] = None
        self._stream: Optional[_ClipStream] = None

    @property
    def info(self) -> Optional[MediaInfo]:
        return self._stream.info if self._stream else None

    @property
    def truncated(self) -> bool:
        return bool(self._stream and self._stream.truncated)

    def __iter__(self) -> Iterator[Clip]:
        clock = _Clock(self.cfg)
        try:
            with local_file(self.path, self.cfg.max_download_bytes) as local:
                self._stream = _ClipStream(local, self.path, self.cfg, clock)
                yield from self._stream
        except MediaError as e:
            self.error = e
        except Exception as e:  # whatever else broke on this input is this input's error, never its neighbours'
            self.error = InternalError.of(self.path, e)


def iter_clips(path: str, cfg: MediaConfig = MediaConfig()) -> Iterator[Clip]:
    """Stream the clips of one file or URI as they are decoded. A `MediaError` is raised after the clips that were
    decoded before it (a file damaged part-way), or at once when the file cannot be read at all."""
    decoding = Decoding(path, cfg)
    yield from decoding
    if decoding.error is not None:
        raise decoding.error


def decode(path: str, cfg: MediaConfig = MediaConfig()) -> DecodeResult:
    """All clips of one file (at most `cfg.max_clips`), with the error that ended decoding (if any) instead of
    raising it. `info` is the stream dump of the decoding ffmpeg, its duration read from the packets when the header
    has none."""
    decoding = Decoding(path, cfg)
    clips = list(decoding)
    return DecodeResult(decoding.info, clips, decoding.error, decoding.truncated)


def decode_audio(path: str, sample_rate: int = 16000, seconds: Optional[float] = None,
                 timeout_s: float = 60.0) -> np.ndarray:
    """The audio track of any file ffmpeg reads (audio-only files included), mono float32 at `sample_rate`."""
    path = str(path)
    limits = input_args()
    with local_file(path) as local:
        if not probe(local, timeout_s).has_audio:
            raise NoAudioStream(path, "has no audio stream")
        options = {"format": "f32le", "ac": 1, "ar": sample_rate}
        if seconds is not None:
            options["t"] = seconds
        inp = ffmpeg.input(ffmpeg_url(local), **_options(limits))
        cmd = inp.audio.output("pipe:", **options).compile(cmd=ffmpeg_exe())
        try:
            done = subprocess.run([cmd[0], "-hide_banner", "-nostdin", "-v", "error", *cmd[1:]], capture_output=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DecodeTimeout(path, f"audio decoding took longer than {timeout_s:g} s") from None
    if done.returncode != 0:
        raise CorruptMedia(path, f"audio decoding failed: {done.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(done.stdout, np.float32).copy()


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
    cmd = [compiled[0], "-hide_banner", "-nostdin", "-v", "error", "-y", *compiled[1:]]
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
