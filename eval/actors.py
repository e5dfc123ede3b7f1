"""The evaluation stage's workers: plain callables over numpy batches, run by Ray Data as actor pools or tasks.

    Generate    sample rows -> the generated clip of each (`frames`, `audio`), from a trained LLM export
    decode_real manifest rows -> real clips at the model's clip settings, the reference set of FVD
    Features    clips -> I3D features, CLIP similarity to the prompt, CLIP zero-shot and oracle attributes

Failures are rows, not exceptions (`ok`, `error`): one unreadable conditioning or real file must not take the
block down with it. Frames leave `Features` only for the rows marked `keep_media` (the MP4s and the frame grid);
every other row goes on as scalars and features. Missing text travels as "" and missing numbers as NaN, because
Ray Data turns a column that is null in a whole block into float NaN, which then clashes with blocks holding text.

Weights: I3D and CLIP load local files; where none is given they are randomly initialized, seeded, so every actor
holds the same network, and written to a temporary file that goes through the same loader as real weights. Such
numbers measure nothing about the samples and every output labels them as random-init. This module imports no Ray.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from eval.clip_score import ClipConfig, ClipSimilarity
from eval.fairness import ATTRIBUTE_PROMPTS, ClipAttributeClassifier
from eval.i3d import I3DConfig, I3DFeatureExtractor, InceptionI3d
from eval.oracle_classifier import OracleAttributeClassifier
from eval.prompts import ROW_COLUMNS, needs_condition, render_condition
from pipeline.ffmpeg import MediaError
from pipeline.generation import Condition, SamplingConfig, VideoPoet, load_frames
from pipeline.media import MediaConfig, decode
from pipeline.oracle import read_audio_attributes
from pipeline.sequence import TASKS, Task
from pipeline.synth import ATTRIBUTES


NO_FRAMES = np.zeros((0, 0, 0, 3), np.uint8)
NO_AUDIO = np.zeros(0, np.float32)
NO_FEATURES = np.zeros(0, np.float64)


def _device() -> torch.device:
    # Ray hides GPUs from actors that did not ask for one, so this is the actor's own assignment.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    """bf16 autocast on a GPU (the networks' forwards; the tokenizers' quantizers keep float32), nothing on the CPU."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _items(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A numpy batch as rows of plain Python values."""
    n = len(next(iter(batch.values()), []))
    return [{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in batch.items()} for i in range(n)]


def _columns(rows: list[dict[str, Any]], names: list[str]) -> dict[str, np.ndarray]:
    """Rows -> columns; arrays (frames, audio, features) as object columns, since their shapes differ."""
    out = {}
    for name in names:
        values = [row[name] for row in rows]
        if values and isinstance(values[0], np.ndarray):
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
        else:
            out[name] = np.array(values, dtype=object if values and isinstance(values[0], str) else None)
    return out


def is_random(i3d: I3DConfig, clip: ClipConfig) -> dict[str, bool]:
    """Which networks run on random weights (no weights file given)."""
    return {"i3d": not i3d.weights, "clip": not clip.weights and not clip.model.startswith("local-dir:")}


def random_i3d() -> InceptionI3d:
    """I3D with He-initialized convolutions. PyTorch's default init shrinks activations layer by layer, so through
    the ~60 layers every clip maps to nearly the same logits (FVD ~1e-11); He init keeps them input-dependent."""
    network = InceptionI3d()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    return network


@contextlib.contextmanager
def with_weights(i3d: I3DConfig, clip: ClipConfig, seed: int) -> Iterator[tuple[I3DConfig, ClipConfig]]:
    """The configs, with seeded random-init weights written to a temporary folder where none are given."""
    random = is_random(i3d, clip)
    with tempfile.TemporaryDirectory(prefix="videopoet-eval-") as tmp:
        if random["i3d"]:
            torch.manual_seed(seed)
            i3d = replace(i3d, weights=str(Path(tmp) / "i3d_random_init.pt"))
            torch.save(random_i3d().state_dict(), i3d.weights)
        if random["clip"]:
            torch.manual_seed(seed)
            clip = replace(clip, weights=str(Path(tmp) / "clip_random_init.pt"))
            torch.save(open_clip.create_model(clip.model).state_dict(), clip.weights)
        yield i3d, clip


# ---------------------------------------------------------------------------------------------------- generate

GENERATED = ("frames", "audio", "ok", "error")


class Generate:
    """Sample rows -> generated clips. The LLM and the tokenizers (conditions in, codes out) run on the actor's GPU
    under bf16 autocast when it has one; frames and audio stay host arrays between the calls."""

    def __init__(self, model_dir: str, sampling: SamplingConfig):
        self.device = _device()
        self.poet = VideoPoet.load(model_dir, device=self.device)
        self.sampling = sampling

    def condition(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """The visual and audio condition: the first clip of the row's file, or the world's clip of its attributes."""
        if row["path"]:
            return load_frames(row["path"], self.poet.media, image=TASKS[Task(row["task"])].video_in == "image")
        attributes = {a: row[f"expected_{a}"] for a in ATTRIBUTES}
        return render_condition(attributes, self.poet.media, row["seed"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of one task are sampled together, each with its own seed (as if alone); a condition that cannot be
        read fails its row only."""
        rows = _items(batch)
        generated: list[dict[str, Any] | None] = [None] * len(rows)
        by_task: dict[str, list[tuple[int, Condition]]] = {}
        for i, row in enumerate(rows):
            frames = audio = None
            try:
                if needs_condition(row["task"]):
                    frames, audio = self.condition(row)
            except MediaError as e:
                generated[i] = {"frames": NO_FRAMES, "audio": NO_AUDIO, "ok": False,
                                "error": f"condition {row['path']}: {e}"}
                continue
            by_task.setdefault(row["task"], []).append((i, Condition(row["prompt"] or None, frames, audio)))
        for task, items in by_task.items():
            with _autocast(self.device):
                results = self.poet.generate_batch(task, [c for _, c in items], sampling=self.sampling,
                                                   seeds=[rows[i]["seed"] for i, _ in items], batch_size=len(items))
            for (i, _), result in zip(items, results):
                audio_out = NO_AUDIO if result.audio is None else np.asarray(result.audio, np.float32)
                generated[i] = {"frames": result.frames, "audio": audio_out, "ok": True, "error": ""}
        return _columns([{**row, **out} for row, out in zip(rows, generated)], [*ROW_COLUMNS, *GENERATED])


# ---------------------------------------------------------------------------------------------------- real clips

def _real_rows(item: dict[str, Any], media: MediaConfig) -> list[dict[str, Any]]:
    base = {"source": "real", "prompt_id": -1, "task": "", "prompt": item["caption"] or "", "seed": -1,
            "path": item["path"], **{f"expected_{a}": "" for a in ATTRIBUTES}, "keep_media": False}
    result = decode(item["path"], media)
    rows = [{**base, "id": f"{item['id']}#{clip.index}", "frames": clip.frames,
             "audio": NO_AUDIO if clip.audio is None else clip.audio, "ok": True, "error": ""}
            for clip in result.clips]
    if result.error is not None or not rows:
        error = result.error or MediaError(item["path"], "no clip could be decoded")
        rows.append({**base, "id": f"{item['id']}#error", "frames": NO_FRAMES, "audio": NO_AUDIO, "ok": False,
                     "error": str(error)})
    return rows


def decode_real(batch: dict[str, np.ndarray], media: MediaConfig, clips_per_video: int) -> dict[str, np.ndarray]:
    """Manifest rows (id, path, caption) -> the first `clips_per_video` clips of each file at the model's clip
    settings, with the columns of generated rows, so both streams meet in one `Features` pool."""
    media = replace(media, max_clips=clips_per_video)
    rows = [row for item in _items(batch) for row in _real_rows(item, media)]
    return _columns(rows, [*ROW_COLUMNS, *GENERATED])


# ---------------------------------------------------------------------------------------------------- features

def _video_out(row: dict[str, Any]) -> str:
    """What the row's frames are: a task's video output ("clip", "rest", "image"), "none" when they are the given
    video through the tokenizer (video-to-audio), and "clip" for a real clip."""
    return "clip" if row["source"] == "real" else TASKS[Task(row["task"])].video_out


def _groups(indices: list[int], frames: list[np.ndarray]) -> Iterator[tuple[list[int], np.ndarray]]:
    """Rows of equal clip shape, stacked into one (B, T, H, W, 3) batch."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i in indices:
        by_shape[frames[i].shape].append(i)
    for members in by_shape.values():
        yield members, np.stack([frames[i] for i in members])


FEATURE_COLUMNS = ("i3d_features", "clip_similarity", "clip_score", *(f"clip_{a}" for a in ATTRIBUTE_PROMPTS),
                   *(f"oracle_{m}_{a}" for m in ("video", "audio") for a in ATTRIBUTES), "oracle_match")


class Features:
    """Clips -> what the driver reduces to metrics.

    i3d_features   the I3D logits averaged over time, for generated videos (not images, not the given video of
                   video-to-audio) and real clips with at least the frames I3D takes
    clip_*         CLIP similarity to the prompt (raw cosine and x100 clamped; NaN without a prompt or generated
                   video) and the CLIP zero-shot class of each fairness attribute
    oracle_*       the oracle's reads of the video and the audio ("" where nothing is read), and whether the
                   generated modality matches the row's expected attributes

    I3D and CLIP run on the actor's GPU under bf16 autocast when it has one (features and embeddings come back as
    float32 on the host, and FVD is reduced in float64 as on the CPU), in float32 on the CPU.
    """

    def __init__(self, i3d: I3DConfig, clip: ClipConfig, init_seed: int, sample_rate: int):
        self.device = _device()
        with with_weights(i3d, clip, init_seed) as (i3d_cfg, clip_cfg):
            self.i3d = I3DFeatureExtractor(i3d_cfg, self.device)
            self.zero_shot = ClipAttributeClassifier(clip_cfg, device=self.device)
        self.oracle = OracleAttributeClassifier()
        self.sample_rate = sample_rate

    def i3d_features(self, rows: list[dict[str, Any]]) -> list[np.ndarray]:
        frames = [row["frames"] for row in rows]
        wanted = [i for i, row in enumerate(rows) if row["ok"] and len(frames[i]) >= self.i3d.config.num_frames
                  and _video_out(row) in ("clip", "rest")]
        out = [NO_FEATURES] * len(rows)
        for members, videos in _groups(wanted, frames):
            for i, features in zip(members, self.i3d(videos)):
                out[i] = features
        return out

    def clip_columns(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One CLIP pass over the frames serves the prompt similarity and the zero-shot labels."""
        encoder, text = self.zero_shot.encoder, self.zero_shot.text
        out = [{"clip_similarity": np.nan, "clip_score": np.nan, **{f"clip_{a}": "" for a in text}} for _ in rows]
        frames = [row["frames"] for row in rows]
        for members, videos in _groups([i for i, row in enumerate(rows) if row["ok"]], frames):
            embeddings = encoder.encode_frames(videos)  # (B, T, D), unit norm
            video = F.normalize(embeddings.mean(dim=1), dim=-1)
            for attribute, prompts in text.items():
                classes = self.zero_shot.attributes[attribute]
                for i, label in zip(members, (video @ prompts.T).argmax(dim=1).tolist()):
                    out[i][f"clip_{attribute}"] = classes[label]
            scored = [k for k, i in enumerate(members) if rows[i]["prompt"] and _video_out(rows[i]) != "none"]
            if scored:
                captions = encoder.encode_text([rows[members[k]]["prompt"] for k in scored])
                cosines = torch.einsum("btd,bd->bt", embeddings[scored], captions).double().numpy()
                similarity = ClipSimilarity.from_cosines(cosines)
                for k, s, c in zip(scored, similarity.clip_similarity, similarity.clip_score):
                    out[members[k]].update(clip_similarity=float(s), clip_score=float(c))
        return out

    def oracle_columns(self, row: dict[str, Any]) -> dict[str, Any]:
        video = self.oracle.read(row["frames"]) if row["ok"] else dict.fromkeys(ATTRIBUTES)
        audio = (read_audio_attributes(row["audio"], self.sample_rate) if row["ok"] and len(row["audio"])
                 else dict.fromkeys(ATTRIBUTES))
        generated = audio if _video_out(row) == "none" else video
        expected = {a: row[f"expected_{a}"] for a in ATTRIBUTES}
        return {**{f"oracle_video_{a}": video[a] or "" for a in ATTRIBUTES},
                **{f"oracle_audio_{a}": audio[a] or "" for a in ATTRIBUTES},
                "oracle_match": all(expected.values()) and generated == expected}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = _items(batch)
        with _autocast(self.device):
            features, clips = self.i3d_features(rows), self.clip_columns(rows)
        for row, feature, clip in zip(rows, features, clips):
            row.update(clip, **self.oracle_columns(row), i3d_features=feature)
            if not row["keep_media"]:
                row.update(frames=NO_FRAMES, audio=NO_AUDIO)
        return _columns(rows, [*ROW_COLUMNS, *GENERATED, *FEATURE_COLUMNS])
