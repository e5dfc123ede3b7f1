"""Generation: a trained LLM export with its tokenizers and text conditioner, from prompts and media to clips.

`VideoPoet.load(model_dir)` reads what `videopoet train llm` exported (weights, config, word vocabulary, and the
record of the tokenizers that wrote its training shards). `generate(task, ...)` tokenizes the conditions, samples
the output with the KV-cached sampler (logits restricted to each position's valid range, so every sample parses),
and decodes the codes back to frames and audio; `generate_batch(task, conditions)` samples many conditions a batch at
a time, each as `generate` would. Long videos extend a clip repeatedly, conditioned on its last latent frames
(`extend`).

Super-resolution cascades after the base model: `VideoPoet.load(model_dir, sr=[stage_dir, ...])` adds the exports of
`videopoet train sr`, each a 2x stage whose low-res input is the previous stage's output (the base model's codes for
the first). `upsample(codes, prompt)` runs every stage by guided parallel decoding and decodes the last stage's codes
with its video tokenizer; `upsample_frames` does the same for a video of any length (an extended video, an image),
clip by clip, from its frames.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.fs as pa_fs
import torch
from torch import Tensor

from pipeline.checkpoint import CONFIG_FILE, load_checkpoint, local_export, read_metadata
from pipeline.config import from_dict
from pipeline.magvit import tensor_to_video, video_to_tensor
from pipeline.masking import DecodingConfig
from pipeline.media import MediaConfig, MediaError, decode
from pipeline.sampling import generate as sample
from pipeline.sequence import TASKS, Layout, Task, build_prompt, central_mask, parse_sequence
from pipeline.storage import is_uri, resolve_filesystem
from pipeline.structure import KIND as STRUCTURE_KIND
from pipeline.structure import structure_video
from pipeline.text import WORDS_FILE, TextCondition, TextConfig, TextConditioner, WordVocabulary, \
    load_text_conditioner, stack_embeddings


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0  # classifier-free guidance scale; 1 = off
    seed: int = 0


@dataclass(frozen=True)
class Condition:
    """What one sample is generated from: a caption, frames (a clip, or an image as 1 frame), float32 audio."""
    prompt: str | None = None
    frames: np.ndarray | None = None
    audio: np.ndarray | None = None


@dataclass(frozen=True)
class _Prepared:
    layout: Layout
    prompt_ids: np.ndarray
    forced: np.ndarray | None
    video_codes: np.ndarray | None
    audio_codes: np.ndarray | None


@dataclass
class Generated:
    task: Task
    ids: np.ndarray  # the whole sequence
    video_codes: np.ndarray | None  # (t, h, w)
    audio_codes: np.ndarray | None  # (levels, frames)
    frames: np.ndarray | None  # uint8 (T, H, W, 3)
    audio: np.ndarray | None  # float32 (samples,)
    hr_video_codes: np.ndarray | None = None  # the last super-resolution stage's codes, when frames come from it


def text_inputs(conditions: Sequence[TextCondition], device: torch.device | str = "cpu"
                ) -> tuple[Tensor | None, Tensor | None]:
    """The super-resolution model's text for a batch of captions: word ids (B, L) or embeddings (B, L, width),
    zero-padded, and the mask of real positions (B, L); (None, None) when no caption has any text."""
    lengths = torch.tensor([len(c) for c in conditions], dtype=torch.long)
    if not len(lengths) or not lengths.any():
        return None, None
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    text = stack_embeddings(conditions)
    if text is None:
        text = torch.zeros(mask.shape, dtype=torch.long)
        for row, condition in enumerate(conditions):
            text[row, :len(condition)] = torch.from_numpy(condition.tokens)
    return text.to(device), mask.to(device)


class SuperResStage:
    """One 2x stage: an export of `videopoet train sr`, the video tokenizer of its shards and its text conditioner."""

    def __init__(self, model, video_tokenizer, text: TextConditioner, tokenizer_fingerprint: str, source: str,
                 decoding: DecodingConfig | None = None):
        self.model = model
        self.decoding = decoding or model.config.decoding  # parallel-decoding steps, guidance and temperatures
        self.video_tokenizer = video_tokenizer
        self.text = text
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.source = source

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu",
             text_encoder: str | Path | None = None) -> "SuperResStage":
        """A stage conditioned by a frozen text encoder takes it from `text_encoder`, a folder the caller names,
        never from a path in the export's JSON: loading an encoder runs a `torch.export` program, which data (a
        downloaded export) must not be able to choose."""
        model_dir = local_export(model_dir)
        meta = read_metadata(model_dir)
        tokenizers = meta["extra"].get("tokenizers")
        if meta["kind"] != "superres" or not tokenizers:
            raise ValueError(f"{model_dir}: not a super-resolution export of `videopoet train sr` "
                             f"(kind {meta['kind']!r})")
        location = _local(tokenizers["video"]["location"])
        text_cfg = from_dict(TextConfig, meta["extra"]["text"])
        if text_cfg.kind == "words":
            text = WordVocabulary.load(model_dir / WORDS_FILE)
        elif text_encoder is None:
            raise ValueError(f"{model_dir}: conditioned on a frozen text encoder (its {CONFIG_FILE} names "
                             f"{text_cfg.path!r}); an encoder is a program, so an export never chooses one: pass "
                             "the encoder folder you trust (text_encoder=DIR; videopoet generate --sr-text-encoder)")
        else:
            text = load_text_conditioner(replace(text_cfg, path=str(text_encoder)))
        return cls(load_checkpoint(model_dir, device), load_checkpoint(location, device), text,
                   read_metadata(location)["fingerprint"], str(model_dir))

    @property
    def lr_grid(self) -> tuple[int, int, int]:
        return self.model.config.lr_grid

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.model.config.grid

    @torch.no_grad()
    def upsample(self, codes: np.ndarray, prompt: str | None = None, seed: int = 0) -> np.ndarray:
        """Low-res codes (t, h, w) -> high-res codes (t, 2h, 2w) by guided parallel decoding (`self.decoding`)."""
        if tuple(codes.shape) != self.lr_grid:
            raise ValueError(f"super-resolution stage {self.source}: takes codes {self.lr_grid}, got {codes.shape}")
        device = next(self.model.parameters()).device
        text, text_mask = text_inputs(self.text.condition([prompt]) if prompt else [], device)
        generator = torch.Generator(device).manual_seed(seed)
        lr = torch.from_numpy(np.asarray(codes)).long()[None].to(device)
        codes = self.model.generate(lr, text, text_mask, generator=generator, **asdict(self.decoding))
        return codes[0].cpu().numpy()

    @torch.no_grad()
    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        return _decode_frames(self.video_tokenizer, codes)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _decode_frames(tokenizer, codes: np.ndarray) -> np.ndarray:
    """Video codes (t, h, w) -> uint8 frames (T, H, W, 3) on the host, decoded on the tokenizer's device."""
    codes = torch.from_numpy(np.asarray(codes))[None].long().to(_device(tokenizer))
    return tensor_to_video(tokenizer.decode(codes))[0].cpu().numpy()


def check_cascade(grid: tuple[int, int, int], fingerprint: str, stages: Sequence[SuperResStage]) -> None:
    """Each stage must take the codes the one before it gives: same grid, same video tokenizer."""
    before = "the base model"
    for stage in stages:
        if stage.lr_grid != tuple(grid):
            raise ValueError(f"super-resolution stage {stage.source} takes codes {stage.lr_grid}, but {before} "
                             f"gives {tuple(grid)}")
        if stage.tokenizer_fingerprint != fingerprint:
            raise ValueError(f"super-resolution stage {stage.source} was trained on codes of video tokenizer "
                             f"{stage.tokenizer_fingerprint}, but {before} gives codes of {fingerprint}")
        grid, before = stage.grid, f"stage {stage.source}"


class VideoPoet:
    def __init__(self, model, video_tokenizer, audio_tokenizer, words: WordVocabulary, media: MediaConfig,
                 stages: Sequence[SuperResStage] = (), structure: str | bool = STRUCTURE_KIND):
        self.model = model
        self.video_tokenizer = video_tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.words = words
        self.media = media
        self.vocab = model.config.vocab
        self.stages = list(stages)
        self.structure = structure  # the structure video the model was trained on (its shards' setting)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", sr: Sequence[str | Path] = (),
             sr_text_encoder: str | Path | None = None) -> "VideoPoet":
        """An LLM export, and the super-resolution exports `sr` to cascade after it, lowest resolution first
        (`sr_text_encoder`: the text encoder folder of stages conditioned on one, see `SuperResStage.load`)."""
        model_dir = local_export(model_dir)
        meta = read_metadata(model_dir)
        extra = meta["extra"]
        tokenizers = extra.get("tokenizers")
        if meta["kind"] != "llm" or not tokenizers:  # a super-resolution export records tokenizers too
            raise ValueError(f"{model_dir}: not an LLM export of `videopoet train llm` (kind {meta['kind']!r}"
                             f"{'' if tokenizers else ', no tokenizer record'})")
        video_dir = _local(tokenizers["video"]["location"])
        video = load_checkpoint(video_dir, device)
        audio = load_checkpoint(_local(tokenizers["audio"]["location"]), device) if tokenizers.get("audio") else None
        media = from_dict(MediaConfig, extra["media"]["media"])
        stages = [SuperResStage.load(stage_dir, device, sr_text_encoder) for stage_dir in sr]
        poet = cls(load_checkpoint(model_dir, device), video, audio, WordVocabulary.load(model_dir / WORDS_FILE),
                   media, stages, extra["media"].get("structure", False))
        check_cascade(poet.latent_grid, read_metadata(video_dir)["fingerprint"], stages)
        return poet

    # ------------------------------------------------------------------------------------------------ tokenizing

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        return self.video_tokenizer.latent_shape(self.media.clip_frames, self.media.height, self.media.width)

    @property
    def audio_grid(self) -> tuple[int, int] | None:
        return None if self.audio_tokenizer is None else self.audio_tokenizer.latent_shape(self.media.clip_samples)

    # The tokenizers run on their own device (the LLM's, when loaded with `device=`); arrays in and out stay on the
    # host. uint8 frames cross to the device before they become float: a quarter of the bytes.

    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) -> codes (t, h, w)."""
        frames = torch.from_numpy(np.asarray(frames))[None].to(_device(self.video_tokenizer))
        return self.video_tokenizer.encode(video_to_tensor(frames))[0].cpu().numpy()

    @torch.no_grad()
    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        if self.audio_tokenizer is None:
            raise ValueError("this model was trained without an audio tokenizer")
        audio = torch.from_numpy(np.asarray(audio, np.float32))[None].to(_device(self.audio_tokenizer))
        return self.audio_tokenizer.encode(audio)[0].cpu().numpy()

    @torch.no_grad()
    def decode_video(self, codes: np.ndarray) -> np.ndarray:
        return _decode_frames(self.video_tokenizer, codes)

    @torch.no_grad()
    def decode_audio(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.from_numpy(np.asarray(codes))[None].long().to(_device(self.audio_tokenizer))
        audio = self.audio_tokenizer.decode(codes)[0].float().clamp(-1, 1).cpu().numpy()
        return np.pad(audio, (0, max(0, self.media.clip_samples - len(audio))))

    # ------------------------------------------------------------------------------------------------ sampling

    def generate(self, task: Task | str, *, prompt: str | None = None, frames: np.ndarray | None = None,
                 audio: np.ndarray | None = None, context_frames: int = 1,
                 sampling: SamplingConfig = SamplingConfig()) -> Generated:
        """One sample of `task`. frames: the visual condition as a clip (or an image: 1 frame); audio: float32."""
        return self.generate_batch(task, [Condition(prompt, frames, audio)], context_frames=context_frames,
                                   sampling=sampling)[0]

    def generate_batch(self, task: Task | str, conditions: Sequence[Condition], *, context_frames: int = 1,
                       sampling: SamplingConfig = SamplingConfig(), seeds: Sequence[int] | None = None,
                       batch_size: int = 16) -> list[Generated]:
        """One sample of `task` per condition, up to `batch_size` of them decoded together (one token step serves
        the whole batch). Sample i is drawn with seed `seeds[i]` (by default `sampling.seed + i`): what `generate`
        gives for its condition with that seed."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        seeds = [sampling.seed + i for i in range(len(conditions))] if seeds is None else list(seeds)
        if len(seeds) != len(conditions):
            raise ValueError(f"seeds: {len(seeds)} for {len(conditions)} conditions")
        task = Task(task)
        prepared = [self._prepare(task, c, context_frames) for c in conditions]
        groups: dict[int, list[int]] = {}  # captions of other lengths make other layouts
        for i, item in enumerate(prepared):
            groups.setdefault(item.layout.prefix_length, []).append(i)
        ids: list[np.ndarray | None] = [None] * len(prepared)
        for members in groups.values():
            for first in range(0, len(members), batch_size):
                rows = members[first:first + batch_size]
                items = [prepared[i] for i in rows]
                forced = None if items[0].forced is None else np.stack([item.forced for item in items])
                out = sample(self.model, items[0].layout, np.stack([item.prompt_ids for item in items]),
                             guidance=sampling.guidance, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, seed=[seeds[i] for i in rows], forced=forced)
                for i, row in zip(rows, out):
                    ids[i] = row
        return [self._result(task, item, row) for item, row in zip(prepared, ids)]

    def _prepare(self, task: Task, condition: Condition, context_frames: int) -> _Prepared:
        """A condition tokenized into its layout, prompt ids and forced output positions."""
        spec = TASKS[task]
        text = self.words.encode(condition.prompt) if condition.prompt and spec.text != "none" else None
        if spec.text == "required" and text is None:
            raise ValueError(f"{task.value}: needs --prompt")
        needs_audio = spec.audio_in != "none" or spec.audio_out != "none"
        grid = (1, *self.latent_grid[1:]) if spec.video_out == "image" else self.latent_grid
        video_codes = self._video_condition(task, condition.frames, grid)
        audio_codes = self._audio_condition(task, condition.audio) if needs_audio else None
        kwargs = {}
        if spec.video_in == "context":
            kwargs["context_frames"] = context_frames
            if spec.audio_in == "context":
                frames_in = 1 + 4 * (context_frames - 1)
                kwargs["context_audio_frames"] = round(frames_in / self.media.fps * self.audio_tokenizer.frame_rate)
        layout = Layout(task, self.vocab, grid, self.audio_grid if needs_audio else None,
                        text_tokens=0 if text is None else len(text), **kwargs)
        condition_mask = None
        if spec.video_in == "masked":
            condition_mask = central_mask(grid)
            condition_mask = condition_mask if task == Task.INPAINTING else ~condition_mask
        prompt_ids = build_prompt(layout, text=text, video=self._visual_input(layout, video_codes),
                                  audio=self._audio_input(layout, audio_codes), mask=condition_mask)
        forced = None  # output positions the condition fixes, given as in training rather than sampled again
        if spec.video_in == "image":  # the clip starts with the image
            forced = self.vocab.video_to_unified(video_codes[0].reshape(-1))
        elif spec.video_in == "masked":  # the clip's visible codes
            forced = np.where(condition_mask.reshape(-1), -1, self.vocab.video_to_unified(video_codes.reshape(-1)))
        return _Prepared(layout, prompt_ids, forced, video_codes, audio_codes)

    def _result(self, task: Task, item: _Prepared, ids: np.ndarray) -> Generated:
        spec = TASKS[task]
        parsed = parse_sequence(ids, item.layout)
        video_out = parsed.video if spec.video_out != "none" else None
        audio_out = parsed.audio if spec.audio_out != "none" else item.audio_codes
        return Generated(task, ids, video_out, audio_out,
                         self.decode_video(video_out if video_out is not None else item.video_codes),
                         None if audio_out is None else self.decode_audio(audio_out))

    def extend(self, frames: np.ndarray, times: int, seconds: float = 1.0,
               sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
        """A longer video: `times` more clips, each predicted from the last `seconds` of what came before.

        The tokenizer is causal, so the last latent frames of one clip are not the first of the next: the last
        1 + 4(k - 1) decoded frames are encoded again as the start of a clip, and their k latent frames condition
        the prediction of the rest.
        """
        t = self.latent_grid[0]
        context = max(1, min(t - 1, 1 + round((seconds * self.media.fps - 1) / 4)))
        given = 1 + 4 * (context - 1)
        video = np.asarray(frames)
        for i in range(times):
            tail = video[-given:]
            padded = np.concatenate([tail, np.repeat(tail[-1:], self.media.clip_frames - given, axis=0)])
            nxt = self._continue(self.encode_video(padded)[:context], context,
                                 replace(sampling, seed=sampling.seed + i + 1))
            video = np.concatenate([video, nxt.frames[given:]])
        return video

    # ------------------------------------------------------------------------------------------------ super-resolution

    def upsample(self, codes: np.ndarray, prompt: str | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The base model's codes (t, h, w) through every stage -> (the last stage's codes, its decoded frames)."""
        if not self.stages:
            raise ValueError("no super-resolution stage loaded (VideoPoet.load(..., sr=[...]))")
        for i, stage in enumerate(self.stages):
            codes = stage.upsample(codes, prompt, seed + i)
        return codes, self.stages[-1].decode_video(codes)

    def upsample_frames(self, frames: np.ndarray, prompt: str | None = None, seed: int = 0) -> np.ndarray:
        """Frames (T, H, W, 3) at the base resolution, any T -> frames at the last stage's resolution: every clip
        (the last one padded with its final frame) is encoded, upsampled and decoded."""
        clip, out = self.media.clip_frames, []
        for start in range(0, len(frames), clip):
            chunk = np.asarray(frames[start:start + clip])
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], clip - len(chunk), axis=0)])
            _, high = self.upsample(self.encode_video(padded), prompt, seed + start)
            out.append(high[:len(chunk)])
        return np.concatenate(out)

    def _continue(self, context_codes: np.ndarray, context: int, sampling: SamplingConfig) -> Generated:
        """Future prediction of a clip whose first `context` latent frames are `context_codes`."""
        layout = Layout(Task.FUTURE_PREDICTION, self.vocab, self.latent_grid, context_frames=context)
        prompt_ids = build_prompt(layout, video=context_codes)
        ids = sample(self.model, layout, prompt_ids, temperature=sampling.temperature, top_k=sampling.top_k,
                     top_p=sampling.top_p, seed=sampling.seed)[0]
        video = parse_sequence(ids, layout).video
        return Generated(Task.FUTURE_PREDICTION, ids, video, None, self.decode_video(video), None)

    def _video_condition(self, task: Task, frames: np.ndarray | None, grid) -> np.ndarray | None:
        spec = TASKS[task]
        if spec.video_in == "none":
            return None
        if frames is None:
            raise ValueError(f"{task.value}: needs a visual condition (--image or --video)")
        frames = np.asarray(frames)
        if len(frames) < self.media.clip_frames and spec.video_in != "image":
            pad = self.media.clip_frames - len(frames)
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        if spec.video_in == "image":
            return self.encode_video(frames[:1])
        frames = frames[: self.media.clip_frames]
        if spec.video_in == "structure":  # stylization conditions on the clip's flow and edges
            if self.structure != STRUCTURE_KIND:
                # Shards written before the kind was recorded say `true`: flow and raw luminance.
                trained = {False: "on shards without structure videos",
                           True: "on structure videos of flow and raw luminance (an earlier version)"}.get(
                    self.structure, f"on structure videos of kind {self.structure!r}")
                raise ValueError(f"stylization: the model was trained {trained}; this version computes "
                                 f"{STRUCTURE_KIND!r}: tokenize with --structure and train again")
            frames = structure_video(frames[None])[0]
        return self.encode_video(frames)

    def _audio_condition(self, task: Task, audio: np.ndarray | None) -> np.ndarray | None:
        spec = TASKS[task]
        if spec.audio_in == "none":
            return None
        if audio is None:
            raise ValueError(f"{task.value}: needs an audio condition (--audio, or a --video with sound)")
        audio = np.asarray(audio, np.float32)[: self.media.clip_samples]
        return self.encode_audio(np.pad(audio, (0, self.media.clip_samples - len(audio))))

    @staticmethod
    def _visual_input(layout: Layout, codes: np.ndarray | None) -> np.ndarray | None:
        shape = layout.input_video_shape
        return None if codes is None or shape is None else codes[: shape[0]]

    @staticmethod
    def _audio_input(layout: Layout, codes: np.ndarray | None) -> np.ndarray | None:
        shape = layout.input_audio_shape
        return None if codes is None or shape is None else codes[:, : shape[1]]


def model_dir(checkpoint: str | Path) -> Path:
    """The local folder of an export given as a run folder of `videopoet train llm` / `train sr` or as its `model/`
    export, local or behind an object-store URI (copied here, `local_export`)."""
    location = str(checkpoint)
    if is_uri(location):
        fs, path = resolve_filesystem(location)
        run_folder = fs.get_file_info(posixpath.join(path, "model", CONFIG_FILE)).type == pa_fs.FileType.File
        return local_export(f"{location.rstrip('/')}/model" if run_folder else location)
    path = Path(checkpoint)
    return path / "model" if (path / "model" / CONFIG_FILE).exists() else path


def load_frames(path: str, media: MediaConfig, image: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The first clip of a file (or its first frame, for an image) at the model's clip settings, and its audio."""
    result = decode(path, replace(media, max_clips=1))
    if not result.clips:
        raise result.error or MediaError(path, "no clip could be decoded")
    clip = result.clips[0]
    return (clip.frames[:1] if image else clip.frames), clip.audio


def _local(location: str) -> Path:
    """A tokenizer export as its record names it (a path or a URI), as a local folder."""
    return local_export(location) if is_uri(location) else Path(location).expanduser().resolve()
