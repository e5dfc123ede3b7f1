"""The decode stage: manifest rows -> clip rows, with failures as rows instead of exceptions.

One corrupt file must never take its neighbours down (Ray Data's `max_errored_blocks` would drop the whole block),
so every input yields rows: one per decoded clip (`ok` true), plus one error row (`ok` false, clip_index -1) when
decoding failed, even part-way (the clips before the damage are kept). No exception type leaves the stage: what
`pipeline.media.Decoding` does not turn into a typed error, a fault in building the rows does (`internal`). A
picture, a one-frame clip, gets its frame repeated to a whole clip like any source shorter than one (`padded_frames`;
`too_short` with `media.short = 'skip'`), so that every row's frames have one shape.

Clips stream: an input's rows go out in batches of at most ROWS_PER_BATCH as they are decoded, never all of an
input at once. The last batch of an input tells how many rows it made (`input_rows`, 0 on the batches before it)
and whether `max_clips` cut it short (`truncated`). Columns are fixed, so batches concatenate.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pipeline.ffmpeg import InternalError, MediaError, TooShort
from pipeline.media import Clip, Decoding, MediaConfig, MediaInfo

CLIP_COLUMNS = ("clip_id", "id", "source", "path", "caption", "clip_index", "start", "end", "frames", "audio",
                "has_audio", "padded_frames", "source_fps", "source_width", "source_height", "source_duration",
                "ok", "error_kind", "error_message", "input_rows", "truncated")
ROWS_PER_BATCH = 8  # at 128x128 (the paper's size) a batch of frames is 6.7 MB; at 2x, 27 MB


def clip_id(row_id: str, index: int) -> str:
    return f"{row_id}#{index:05d}"


class DecodeClips:
    """Callable stage for `Dataset.map_batches(batch_format="numpy")`: a batch of manifest rows -> batches of clip
    rows (a generator: Ray Data takes each as it comes).

    Frames are uint8 (T, H, W, 3); audio is float32 (samples,), zeros with `has_audio` false for a silent source,
    so the columns keep one shape and stack into tensors.
    """

    def __init__(self, media: MediaConfig):
        self.media = media

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        for i in range(len(batch["path"])):
            item = {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            yield from self._input_batches(item)

    def _input_batches(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        decoding = Decoding(item["path"], self.media)
        rows: list[dict[str, Any]] = []
        count = 0
        for row in self._rows(item, decoding):
            if len(rows) == ROWS_PER_BATCH:  # flushed only when another row follows: the last batch is never empty
                yield self._columns(rows, 0, False)
                rows = []
            rows.append(row)
            count += 1
        yield self._columns(rows, count, decoding.truncated)

    def _rows(self, item: dict[str, Any], decoding: Decoding) -> Iterator[dict[str, Any]]:
        """The input's clip rows, then its error row if decoding ended early."""
        error: MediaError | None = None
        try:
            for clip in decoding:
                yield self._clip_row(item, decoding.info, clip)
            error = decoding.error
        except MediaError as e:
            error = e
        except Exception as e:  # a row that cannot be built fails its input, not the job
            error = InternalError.of(item["path"], e)
        if error is not None:
            yield {**self._meta(item, decoding.info), "clip_id": clip_id(item["id"], -1), "clip_index": -1,
                   "start": None, "end": None, "frames": self._empty_frames(), "audio": self._silence(),
                   "has_audio": False, "padded_frames": 0, "ok": False, "error_kind": error.kind,
                   "error_message": str(error)}

    def _clip_row(self, item: dict[str, Any], info: MediaInfo | None, clip: Clip) -> dict[str, Any]:
        missing = self.media.clip_frames - len(clip.frames)
        if missing and self.media.short == "skip":
            raise TooShort(item["path"], f"a picture, shorter than one clip of {self.media.clip_frames} frames "
                                         "(short='skip')")
        frames = np.concatenate([clip.frames, np.repeat(clip.frames[-1:], missing, axis=0)]) if missing else \
            clip.frames
        return {**self._meta(item, info), "clip_id": clip_id(item["id"], clip.index), "clip_index": clip.index,
                "start": clip.start, "end": clip.end, "frames": frames,
                "audio": clip.audio if clip.audio is not None else self._silence(),
                "has_audio": clip.audio is not None, "padded_frames": clip.padded_frames + missing, "ok": True,
                "error_kind": None, "error_message": None}

    @staticmethod
    def _meta(item: dict[str, Any], info: MediaInfo | None) -> dict[str, Any]:
        return {"id": item["id"], "source": item["source"], "path": item["path"], "caption": item.get("caption"),
                "source_fps": info.fps if info else None,
                "source_width": info.width if info else None, "source_height": info.height if info else None,
                "source_duration": info.duration if info else None}

    def _empty_frames(self) -> np.ndarray:
        cfg = self.media
        return np.zeros((cfg.clip_frames, cfg.height, cfg.width, 3), np.uint8)

    def _silence(self) -> np.ndarray:
        return np.zeros(self.media.clip_samples, np.float32)

    @staticmethod
    def _columns(rows: list[dict[str, Any]], input_rows: int, truncated: bool) -> dict[str, Any]:
        columns: dict[str, Any] = {k: np.array([row[k] for row in rows], dtype=object)
                                   for k in ("clip_id", "id", "source", "path", "caption", "error_kind",
                                             "error_message")}
        columns["frames"] = np.stack([row["frames"] for row in rows])
        columns["audio"] = np.stack([row["audio"] for row in rows])
        for key, dtype in (("clip_index", np.int64), ("has_audio", bool), ("padded_frames", np.int64), ("ok", bool)):
            columns[key] = np.array([row[key] for row in rows], dtype=dtype)
        for key in ("start", "end", "source_fps", "source_width", "source_height", "source_duration"):
            columns[key] = np.array([np.nan if row[key] is None else row[key] for row in rows], dtype=np.float64)
        columns["input_rows"] = np.full(len(rows), input_rows, np.int64)
        columns["truncated"] = np.full(len(rows), truncated, bool)
        return columns
