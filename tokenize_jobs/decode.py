"""The decode stage: manifest rows -> clip rows, with failures as rows instead of exceptions.

One corrupt file must never take its neighbours down (Ray Data's `max_errored_blocks` would drop the whole block),
so every input yields rows: one per decoded clip (`ok` true), plus one error row (`ok` false, clip_index -1) when
decoding failed, even part-way (the clips before the damage are kept). Columns are fixed, so batches concatenate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.media import MediaConfig, decode

CLIP_COLUMNS = ("clip_id", "id", "source", "path", "caption", "clip_index", "start", "end", "frames", "audio",
                "has_audio", "padded_frames", "source_fps", "source_width", "source_height", "source_duration",
                "ok", "error_kind", "error_message")


def clip_id(row_id: str, index: int) -> str:
    return f"{row_id}#{index:05d}"


class DecodeClips:
    """Callable stage for `Dataset.map_batches(batch_format="numpy")`: a batch of manifest rows -> clip rows.

    Frames are uint8 (T, H, W, 3); audio is float32 (samples,), zeros with `has_audio` false for a silent source,
    so the columns keep one shape and stack into tensors.
    """

    def __init__(self, media: MediaConfig):
        self.media = media

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows: dict[str, list] = {c: [] for c in CLIP_COLUMNS}
        for i in range(len(batch["path"])):
            item = {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()}
            result = decode(item["path"], self.media)
            info = result.info
            meta = {"id": item["id"], "source": item["source"], "path": item["path"], "caption": item.get("caption"),
                    "source_fps": info.fps if info else None,
                    "source_width": info.width if info else None, "source_height": info.height if info else None,
                    "source_duration": info.duration if info else None}
            for clip in result.clips:
                audio = clip.audio if clip.audio is not None else np.zeros(self.media.clip_samples, np.float32)
                self._append(rows, clip_id=clip_id(item["id"], clip.index), clip_index=clip.index,
                             start=clip.start, end=clip.end, frames=clip.frames, audio=audio,
                             has_audio=clip.audio is not None, padded_frames=clip.padded_frames, ok=True,
                             error_kind=None, error_message=None, **meta)
            if result.error is not None:
                self._append(rows, clip_id=clip_id(item["id"], -1), clip_index=-1, start=None, end=None,
                             frames=self._empty_frames(), audio=np.zeros(self.media.clip_samples, np.float32),
                             has_audio=False, padded_frames=0, ok=False, error_kind=result.error.kind,
                             error_message=str(result.error), **meta)
        return self._columns(rows)

    def _empty_frames(self) -> np.ndarray:
        cfg = self.media
        return np.zeros((cfg.clip_frames, cfg.height, cfg.width, 3), np.uint8)

    @staticmethod
    def _append(rows: dict[str, list], **values: Any) -> None:
        for key in CLIP_COLUMNS:
            rows[key].append(values[key])

    def _columns(self, rows: dict[str, list]) -> dict[str, Any]:
        cfg = self.media
        frames_shape = (0, cfg.clip_frames, cfg.height, cfg.width, 3)
        columns: dict[str, Any] = {k: np.array(v, dtype=object) for k, v in rows.items()}
        columns["frames"] = np.stack(rows["frames"]) if rows["frames"] else np.zeros(frames_shape, np.uint8)
        columns["audio"] = (np.stack(rows["audio"]) if rows["audio"]
                            else np.zeros((0, cfg.clip_samples), np.float32))
        for key, dtype in (("clip_index", np.int64), ("has_audio", bool), ("padded_frames", np.int64), ("ok", bool)):
            columns[key] = np.array(rows[key], dtype=dtype)
        for key in ("start", "end", "source_fps", "source_width", "source_height", "source_duration"):
            columns[key] = np.array([np.nan if v is None else v for v in rows[key]], dtype=np.float64)
        return columns
