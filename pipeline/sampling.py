"""Sampling from the VideoPoet LLM: KV-cached decoding with layout constraints and classifier-free guidance.

A prompt is the prefix of a `Layout` (`pipeline.sequence.build_prompt`). `generate` runs it in one bidirectional
forward that fills the KV cache, then decodes the output one token at a time, causally. At every output position
the logits outside that position's valid id range (`Layout.valid_ranges()`) are masked, so the sequence follows the
layout token for token and always parses with `parse_sequence`; forced tokens (`<eov_o>`, `<eos>`) come out as the
only choice.

Classifier-free guidance: the unconditional prompt (by default the prompt without its text, `drop_text`, which is
also what condition dropout in training produces; or a negative prompt) runs as a second half of the batch, left
padded to the longer prompt, and both halves receive the same sampled token. Guided logits are
`cond + (guidance - 1) * (cond - uncond)`, exactly the conditional logits at guidance 1.

`generate_uncached` samples the same way but recomputes the whole sequence at every step: the reference the cache
is tested against, and the baseline of `benchmarks/generate.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.llm import VideoPoetLM
from pipeline.sequence import Layout
from pipeline.vocab import Special


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(N, V) logits with -inf outside each row's top-k (0: all; ties with the k-th are kept) and outside its
    nucleus: the fewest most probable tokens whose probability reaches top_p."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is dropped once the more probable ones already reach top_p; the most probable always stays.
        drop_ordered = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_ordered).scatter(-1, order, drop_ordered)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """One token per row of (N, V) logits; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def drop_text(ids: np.ndarray, layout: Layout) -> np.ndarray:
    """ids (..., n) of `layout`, a prompt or a whole sequence, without `<bot_i> text <eot_i>`: the empty condition."""
    if not (layout.text_tokens or layout.text_embeddings):
        raise ValueError(f"{layout.task.value}: this layout has no text to drop; pass an unconditional prompt")
    ids = np.asarray(ids)
    text = layout.span("text")
    if ids.shape[-1] <= text.stop:
        raise ValueError(f"{layout.task.value}: ids of length {ids.shape[-1]} end before the text's <eot_i> "
                         f"at {text.stop}")
    keep = np.r_[0:text.start - 1, text.stop + 1:ids.shape[-1]]
    return ids[..., keep]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def _batch_of_ids(ids: np.ndarray | Tensor, name: str) -> np.ndarray:
    ids = np.asarray(ids.cpu() if isinstance(ids, Tensor) else ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: expected integer ids (P,) or (B, P), got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def _check_prompt(layout: Layout, prompts: np.ndarray) -> None:
    task, length = layout.task.value, layout.prefix_length
    if prompts.shape[1] != length:
        raise ValueError(f"{task}: prompt_ids hold {prompts.shape[1]} ids, the layout's prefix has {length}")
    low, high = (r[:length] for r in layout.valid_ranges())
    bad = np.argwhere((prompts < low) | (prompts >= high))
    if bad.size:
        row, i = bad[0]
        raise ValueError(f"{task}: prompt_ids[{row}, {i}] = {layout.vocab.describe(prompts[row, i])} does not fit "
                         f"the layout ({layout.segment_at(int(i)).name})")


def _unconditional(layout: Layout, prompts: np.ndarray, uncond: np.ndarray | Tensor | None) -> np.ndarray:
    if uncond is None:
        return drop_text(prompts, layout)
    uncond = _batch_of_ids(uncond, "uncond_prompt_ids")
    if uncond.shape[0] not in (1, len(prompts)):
        raise ValueError(f"uncond_prompt_ids: {uncond.shape[0]} rows for {len(prompts)} prompts")
    if (uncond[:, -1] != prompts[0, -1]).any():
        raise ValueError(f"uncond_prompt_ids must end with the prompt's {layout.vocab.describe(prompts[0, -1])}")
    return np.broadcast_to(uncond, (len(prompts), uncond.shape[1]))


def _text_rows(embeddings: Tensor | None, rows: int, name: str) -> Tensor | None:
    if embeddings is None:
        return None
    if embeddings.ndim == 2:
        embeddings = embeddings[None]
    if embeddings.ndim != 3 or embeddings.shape[0] not in (1, rows):
        raise ValueError(f"{name}: expected (n, width) or ({rows}, n, width), got {tuple(embeddings.shape)}")
    return embeddings.expand(rows, -1, -1)


def _stack_text(parts: list[Tensor | None], rows: int) -> Tensor | None:
    """Text embeddings of each half of the batch, zero-padded to one (rows in all, n, width) tensor."""
    given = [p for p in parts if p is not None]
    if not given:
        return None
    n, width = max(p.shape[1] for p in given), given[0].shape[2]
    like = given[0]
    padded = [like.new_zeros(rows // len(parts), n, width) if p is None
              else torch.cat([p, like.new_zeros(p.shape[0], n - p.shape[1], width)], dim=1) for p in parts]
    return torch.cat(padded)


def _left_pad(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    length = max(p.shape[1] for p in prompts)
    padded = np.concatenate([np.pad(p, ((0, 0), (length - p.shape[1], 0)), constant_values=Special.PAD)
                             for p in prompts])
    start = np.concatenate([np.full(len(p), length - p.shape[1]) for p in prompts])
    return padded, start


# ---------------------------------------------------------------------------------------------------------------------
# Streams: the logits of the next position of every row, after each appended token


class CachedStream:
    """Prefill the prompts once, then one cached forward per token."""

    def __init__(self, model: VideoPoetLM, ids: Tensor, start: Tensor, text_embeddings: Tensor | None, steps: int):
        self.model = model
        self.logits, self.cache = model.prefill(ids, ids.shape[1] + steps, text_embeddings=text_embeddings,
                                                start=start)

    def append(self, tokens: Tensor) -> Tensor:
        return self.model.decode_step(tokens, self.cache)


class UncachedStream:
    """Recompute the whole sequence for every token (prefix bidirectional, the rest causal)."""

    def __init__(self, model: VideoPoetLM, ids: Tensor, start: Tensor, text_embeddings: Tensor | None, steps: int):
        self.model, self.ids, self.start, self.text_embeddings = model, ids, start, text_embeddings
        self.prefix_len = ids.shape[1]
        self.logits = self._last()

    def _last(self) -> Tensor:
        hidden = self.model.hidden(self.ids, self.prefix_len, text_embeddings=self.text_embeddings, start=self.start)
        return self.model.logits(hidden[:, -1])

    def append(self, tokens: Tensor) -> Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self._last()


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def _check_forced(forced: np.ndarray | None, rows: int, low: list[int], high: list[int]) -> np.ndarray:
    """forced as (rows, F): one row for every prompt, -1 where the position is sampled."""
    forced = np.zeros((rows, 0), np.int64) if forced is None else np.asarray(forced, np.int64)
    if forced.ndim == 1:
        forced = np.broadcast_to(forced, (rows, len(forced)))
    if forced.ndim != 2 or len(forced) != rows:
        raise ValueError(f"forced: expected (F,) or ({rows}, F) ids, got shape {forced.shape}")
    if forced.shape[1] > len(low):
        raise ValueError(f"forced: {forced.shape[1]} ids for an output of {len(low)} positions")
    given = forced >= 0
    n = forced.shape[1]
    bad = np.argwhere(given & ((forced < low[:n]) | (forced >= high[:n])))
    if len(bad):
        row, i = bad[0]
        raise ValueError(f"forced: id {forced[row, i]} at output position {i} is outside its valid range "
                         f"[{low[i]}, {high[i]})")
    return forced


def _seeds(seed: int | Sequence[int], rows: int) -> list[int]:
    seeds = [seed + row for row in range(rows)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if len(seeds) != rows:
        raise ValueError(f"seed: {len(seeds)} seeds for {rows} prompts")
    return seeds


@torch.no_grad()
def _generate(stream_class: type[CachedStream] | type[UncachedStream], model: VideoPoetLM, layout: Layout,
              prompt_ids: np.ndarray | Tensor, *, text_embeddings: Tensor | None, uncond_prompt_ids: np.ndarray | None,
              uncond_text_embeddings: Tensor | None, guidance: float, temperature: float, top_k: int, top_p: float,
              seed: int | Sequence[int], forced: np.ndarray | None) -> np.ndarray:
    if layout.vocab != model.config.vocab:
        raise ValueError(f"layout vocabulary {layout.vocab} differs from the model's {model.config.vocab}")
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and math.isfinite(guidance)):
        raise ValueError(f"sampling options: need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and a finite "
                         f"guidance, got temperature={temperature} top_k={top_k} top_p={top_p} guidance={guidance}")
    prompts = _batch_of_ids(prompt_ids, "prompt_ids")
    _check_prompt(layout, prompts)
    batch, device = len(prompts), model.embed.weight.device
    guided = uncond_prompt_ids is not None or guidance != 1
    halves = [prompts, _unconditional(layout, prompts, uncond_prompt_ids)] if guided else [prompts]
    texts = [_text_rows(text_embeddings, batch, "text_embeddings")]
    if guided:
        texts.append(_text_rows(uncond_text_embeddings, batch, "uncond_text_embeddings"))
    ids, start = _left_pad(halves)
    text = _stack_text(texts, len(ids))
    steps = layout.length - layout.prefix_length
    stream = stream_class(model, torch.from_numpy(ids).to(device), torch.from_numpy(start).to(device),
                          None if text is None else text.to(device), steps - 1)
    # One generator per row: a row's draws do not depend on the other rows, so a batch gives each prompt what
    # sampling it alone with its seed gives.
    generators = [torch.Generator(device).manual_seed(s) for s in _seeds(seed, batch)]
    low, high = (r[layout.prefix_length:].tolist() for r in layout.valid_ranges())
    forced = _check_forced(forced, batch, low, high)
    forced_ids = torch.from_numpy(np.ascontiguousarray(forced)).to(device)
    unforced = torch.full((batch,), -1, dtype=torch.long, device=device)
    logits, tokens = stream.logits, []
    for step in range(steps):
        given = step < forced.shape[1]
        token = (forced_ids[:, step] if given else unforced).clone()
        # The rows to sample, read on the host: no device sync per step.
        free = np.flatnonzero(forced[:, step] < 0).tolist() if given else list(range(batch))
        if free:
            logits = logits.float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = cond + (guidance - 1) * (cond - uncond)
            logits[:, :low[step]] = -math.inf
            logits[:, high[step]:] = -math.inf
            if temperature == 0:  # greedy draws nothing: every free row at once
                token[free] = sample(logits[free], temperature=0)
            else:
                for row in free:
                    token[row] = sample(logits[row:row + 1], temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=generators[row])[0]
        tokens.append(token)
        if step + 1 < steps:
            logits = stream.append(token.repeat(len(halves)))
    return np.concatenate([prompts, torch.stack(tokens, dim=1).cpu().numpy()], axis=1)


def generate(model: VideoPoetLM, layout: Layout, prompt_ids: np.ndarray | Tensor, *,
             text_embeddings: Tensor | None = None, uncond_prompt_ids: np.ndarray | Tensor | None = None,
             uncond_text_embeddings: Tensor | None = None, guidance: float = 1.0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0, forced: np.ndarray | None = None
             ) -> np.ndarray:
    """Complete `layout` from its prompt: ids (B, layout.length), the prompt followed by the sampled output.

    prompt_ids (P,) or (B, P): the layout's prefix (`build_prompt`); text_embeddings (n, width) or (B, n, width)
    fill its `<text_embedding>` positions. Guidance != 1 or an unconditional prompt turns on classifier-free
    guidance; the unconditional prompt defaults to the prompt without its text. uncond_text_embeddings fill a
    negative prompt's placeholders. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Row i
    draws with its own generator, seeded `seed + i` (or `seed[i]`), so it gets what sampling its prompt alone with
    that seed gets, on the same device. forced (F,) or (B, F): ids for the first F output positions, taken instead
    of sampled where >= 0: positions whose value the condition already fixes (image-to-video's first frame, the
    visible part of a painting task's clip), given as the model saw them in training.
    """
    return _generate(CachedStream, model, layout, prompt_ids, text_embeddings=text_embeddings,
                     uncond_prompt_ids=uncond_prompt_ids, uncond_text_embeddings=uncond_text_embeddings,
                     guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, forced=forced)


def generate_uncached(model: VideoPoetLM, layout: Layout, prompt_ids: np.ndarray | Tensor, *,
                      text_embeddings: Tensor | None = None, uncond_prompt_ids: np.ndarray | Tensor | None = None,
                      uncond_text_embeddings: Tensor | None = None, guidance: float = 1.0, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int | Sequence[int] = 0,
                      forced: np.ndarray | None = None) -> np.ndarray:
    """`generate` without the KV cache: every step runs the whole sequence again (quadratically slower)."""
    return _generate(UncachedStream, model, layout, prompt_ids, text_embeddings=text_embeddings,
                     uncond_prompt_ids=uncond_prompt_ids, uncond_text_embeddings=uncond_text_embeddings,
                     guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, forced=forced)
