"""The tokenize job's stages: plain callables over numpy batches, run by Ray Data as actor pools.

    Decode           manifest rows -> clip rows (`DecodeClips`), plus the columns the job carries through, then:
      downscale_2x   2x frames -> the base frames (2x2 means) and the 2x frames kept as `frames_hr`
      add_structure  frames -> the structure video (optical flow x, y and luminance edges as 3 channels)
    VideoTokenizer   frame columns -> `<name>_tokens` (rows, t*h*w) int32 and `<name>_shape` (rows, 3)
    AudioTokenizer   audio -> `audio_tokens` (rows, levels*frames) int16, level-major, and `audio_shape`
    TextEncoder      caption -> `text_embeddings` (rows, positions*width) float16, zero-padded, and `text_shape`

Tokenizer stages load their checkpoint once per actor, run on the GPU in bf16 when the actor has one (fp32 on
CPU), tokenize only the rows that decoded (`ok`), and pass every other column through. This module imports no Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from einops import rearrange, reduce

from pipeline.checkpoint import CONFIG_FILE, FINGERPRINT_CHARS, WEIGHTS_FILE, load_checkpoint, read_metadata
from pipeline.magvit import video_to_tensor
from pipeline.media import MediaConfig
from pipeline.sequence import MAX_TEXT_EMBEDDINGS
from pipeline.storage import is_uri, resolve_filesystem
from pipeline.structure import structure_video
from pipeline.text import ENCODER_FILE, WORDS_FILE, FrozenTextEncoder
from pipeline.decode import DecodeClips

TEXT_ENCODER_FILES = (ENCODER_FILE, WORDS_FILE)


# ---------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_metadata(location: str) -> dict[str, Any]:
    """The `config.json` of a checkpoint folder, local or behind a URI."""
    if not is_uri(location):
        return read_metadata(location)
    fs, path = resolve_filesystem(location)
    try:
        with fs.open_input_stream(posixpath.join(path, CONFIG_FILE)) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {location}: no {CONFIG_FILE}") from None


def text_encoder_metadata(location: str) -> dict[str, Any]:
    """What shards record about a frozen text encoder folder: a fingerprint of its files (it has no config)."""
    fs, path = resolve_filesystem(location)
    digest = hashlib.sha256()
    for name in TEXT_ENCODER_FILES:
        try:
            with fs.open_input_stream(posixpath.join(path, name)) as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        except FileNotFoundError:
            raise FileNotFoundError(f"text encoder {location}: no {name}") from None
    return {"fingerprint": digest.hexdigest()[:FINGERPRINT_CHARS], "kind": "frozen_text_encoder",
            "config": {"max_positions": MAX_TEXT_EMBEDDINGS}}


@contextlib.contextmanager
def local_copy(location: str, names: Sequence[str] = (CONFIG_FILE, WEIGHTS_FILE)) -> Iterator[str]:
    """A local folder holding `names` of a model folder: the folder itself, or a temporary copy of a URI's files."""
    if not is_uri(location):
        yield location
        return
    fs, path = resolve_filesystem(location)
    with tempfile.TemporaryDirectory(prefix="videopoet-model-") as tmp:
        for name in names:
            with fs.open_input_stream(posixpath.join(path, name)) as src, open(Path(tmp) / name, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        yield tmp


def _device() -> torch.device:
    # Ray hides GPUs from actors that did not ask for one, so this is the actor's own assignment.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- decode

class Decode:
    """`DecodeClips` (a generator of batches: an input's clips stream), plus the manifest columns the job needs on
    every clip (shard, split, extras); then each of `transforms` (batch -> batch) in order, on the same worker.
    The writer knows an input is complete from `input_rows` (see `pipeline.decode`)."""

    CARRIED = ("shard", "split", "extras")
    # Ray Data turns a column that is null in every row of a block into float NaN when the block goes through
    # numpy, which then clashes with blocks holding text; so missing text travels as "".
    TEXT = ("caption", "split", "extras", "error_kind", "error_message")

    def __init__(self, media: MediaConfig, transforms: Sequence[Callable[[dict], dict]] = ()):
        self.decode = DecodeClips(media)
        self.transforms = tuple(transforms)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        row_of = {key: i for i, key in enumerate(batch["id"])}
        for out in self.decode(batch):
            rows = np.array([row_of[key] for key in out["id"]], dtype=np.int64)
            for name in self.CARRIED:
                out[name] = np.asarray(batch[name])[rows]
            for name in self.TEXT:
                out[name] = np.array(["" if v is None else str(v) for v in out[name]], dtype=object)
            for transform in self.transforms:
                out = transform(out)
            yield out


# ---------------------------------------------------------------------------------------------------- video CPU stages

def downscale_2x(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Frames decoded at twice the size -> `frames` (means of 2x2 pixel blocks) and `frames_hr` (as decoded)."""
    frames = batch["frames"]
    batch["frames_hr"] = frames
    low = reduce(frames.astype(np.float32), "b t (h sh) (w sw) c -> b t h w c", "mean", sh=2, sw=2)
    batch["frames"] = np.round(low).astype(np.uint8)
    return batch


def add_structure(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["structure"] = structure_video(batch["frames"])
    return batch


# ---------------------------------------------------------------------------------------------------- tokenizers

class VideoTokenizer:
    """Tokenizes frame columns with one MAGVIT checkpoint: `columns` pairs an input column with an output name."""

    def __init__(self, checkpoint: str, columns: Sequence[tuple[str, str]] = (("frames", "video"),)):
        self.device = _device()
        with local_copy(checkpoint) as folder:
            self.model = load_checkpoint(folder, self.device)
        self.columns = tuple(columns)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        # uint8 crosses to the device (a quarter of the bytes of float) and is converted there.
        with _autocast(self.device):
            return self.model.encode(video_to_tensor(torch.from_numpy(frames).to(self.device))).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.flatnonzero(batch["ok"])
        for source, name in self.columns:
            frames = batch.pop(source)
            shape = self.model.latent_shape(*frames.shape[1:4])
            tokens = np.zeros((len(frames), int(np.prod(shape))), np.int32)
            if len(ok):
                tokens[ok] = self.encode(frames[ok]).reshape(len(ok), -1)
            batch[f"{name}_tokens"] = tokens
            batch[f"{name}_shape"] = np.tile(np.array(shape, np.int32), (len(frames), 1))
        return batch


class AudioTokenizer:
    """Tokenizes `audio` with one SoundStream checkpoint, rows that decoded and have audio only."""

    def __init__(self, checkpoint: str):
        self.device = _device()
        with local_copy(checkpoint) as folder:
            self.model = load_checkpoint(folder, self.device)

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        with _autocast(self.device):
            codes = self.model.encode(torch.from_numpy(audio).to(self.device))
        return rearrange(codes.cpu().numpy(), "b l f -> b (l f)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audio = batch.pop("audio")
        shape = self.model.latent_shape(audio.shape[1])
        rows = np.flatnonzero(np.asarray(batch["ok"], bool) & np.asarray(batch["has_audio"], bool))
        tokens = np.zeros((len(audio), int(np.prod(shape))), np.int16)
        if len(rows):
            tokens[rows] = self.encode(np.ascontiguousarray(audio[rows], np.float32))
        batch["audio_tokens"] = tokens
        batch["audio_shape"] = np.tile(np.array(shape, np.int32), (len(audio), 1))
        return batch


class TextEncoder:
    """Embeds each row's caption with a frozen text encoder (`pipeline.text.FrozenTextEncoder`), once per distinct
    caption of a batch (the clips of one input share theirs). Rows without a caption get 0 positions."""

    def __init__(self, directory: str):
        with local_copy(directory, TEXT_ENCODER_FILES) as folder:
            self.encoder = FrozenTextEncoder.load(folder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        width, positions = self.encoder.width, self.encoder.max_positions
        distinct = sorted({c for c in captions if c})
        embedded = {c: cond.embeddings for c, cond in zip(distinct, self.encoder.condition(distinct))}
        out = np.zeros((len(captions), positions * width), np.float16)
        shape = np.zeros((len(captions), 2), np.int32)
        shape[:, 1] = width
        for i, caption in enumerate(captions):
            vectors = embedded.get(caption)
            if vectors is not None:
                out[i, : vectors.numel()] = vectors.reshape(-1).numpy()
                shape[i, 0] = len(vectors)
        batch["text_embeddings"], batch["text_shape"] = out, shape
        return batch
