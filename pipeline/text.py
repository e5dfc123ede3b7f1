"""Text conditioning, pluggable: word tokens inside the unified vocabulary, or a frozen text encoder's embeddings.

`WordVocabulary` (the default, no weights): the words of the corpus captions, most frequent first (ties in
alphabetical order), after `<unk>` at index 0. A caption becomes local word ids that `build_sequence(text=...)`
places in the vocabulary's text range, so `Vocabulary(text_size=...)` must be at least the word count. It is built
deterministically from captions and saved as JSON beside a model.

`FrozenTextEncoder` (the paper's option: T5-XL, width 2048, at most 64 positions): a frozen program saved with
`torch.export` in a local directory, with the word vocabulary that tokenizes for it. A caption becomes (n, width)
embeddings; the sequence reserves n `<text_embedding>` positions (`build_sequence(text_embeddings=n)`) and the LLM
projects the embeddings into them (`VideoPoetLM.forward(..., text_embeddings=...)`). The directory holds

    encoder.pt2   `torch.export.save` of forward(ids int64 (B, n), mask bool (B, n)) -> float (B, n, width),
                  exported in eval mode (an exported program keeps the mode it was exported in) with dynamic B and n
    words.json    the WordVocabulary whose ids the encoder takes

Both return one `TextCondition` per caption; `condition.sequence_kwargs()` is what `build_sequence`/`Layout` take
and `stack_embeddings` pads a batch's embeddings for the model. An empty caption gives no text (a task that needs
text skips that row).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.sequence import MAX_TEXT_EMBEDDINGS
from pipeline.storage import save_text
from pipeline.vocab import Vocabulary

UNKNOWN = "<unk>"
ENCODER_FILE = "encoder.pt2"
WORDS_FILE = "words.json"

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def split_words(caption: str) -> list[str]:
    """Lower-case words and numbers (hyphenated words and contractions stay whole); other punctuation is dropped."""
    return _WORD.findall(caption.lower())


@dataclass(frozen=True, eq=False)
class TextCondition:
    """The text of one caption: word ids (n,) for the vocabulary's text range, or embeddings (n, width)."""

    tokens: np.ndarray | None = None
    embeddings: Tensor | None = None

    def __len__(self) -> int:
        values = self.tokens if self.tokens is not None else self.embeddings
        return 0 if values is None else len(values)

    def sequence_kwargs(self) -> dict:
        """`text=` or `text_embeddings=` for `build_sequence` and `Layout`; nothing for an empty caption."""
        if not len(self):
            return {}
        return {"text": self.tokens} if self.tokens is not None else {"text_embeddings": len(self)}


class TextConditioner(Protocol):
    text_size: int  # ids the conditioner needs in the vocabulary's text range (0: it gives embeddings)
    width: int  # embedding width (0: it gives word tokens)

    def condition(self, captions: Sequence[str]) -> list[TextCondition]: ...


def check_fits(conditioner: TextConditioner, vocab: Vocabulary, text_width: int) -> None:
    """Raise unless an LLM with this vocabulary and text projection width can take the conditioner's output."""
    if conditioner.text_size > vocab.text_size:
        raise ValueError(f"text conditioning needs {conditioner.text_size} word ids but the vocabulary's text range "
                         f"holds {vocab.text_size} (set vocab.text_size >= {conditioner.text_size})")
    if conditioner.width and conditioner.width != text_width:
        raise ValueError(f"text embeddings have width {conditioner.width} but the model projects width {text_width} "
                         f"(set text_width = {conditioner.width})")


def stack_embeddings(conditions: Sequence[TextCondition]) -> Tensor | None:
    """The embeddings of a batch, zero-padded to the longest: (B, n, width); None when no row has embeddings."""
    given = [c.embeddings for c in conditions if c.embeddings is not None]
    if not given:
        return None
    n, width = max(len(e) for e in given), given[0].shape[1]
    batch = given[0].new_zeros(len(conditions), n, width)
    for row, condition in enumerate(conditions):
        if condition.embeddings is not None:
            batch[row, :len(condition)] = condition.embeddings
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# Word vocabulary


@dataclass(frozen=True)
class WordVocabulary:
    width = 0  # gives word tokens, not embeddings (a class attribute, not a field)

    words: tuple[str, ...]
    max_words: int = MAX_TEXT_EMBEDDINGS  # a caption's words past this are dropped

    def __post_init__(self):
        if not self.words or self.words[0] != UNKNOWN:
            raise ValueError(f"WordVocabulary: the first word must be {UNKNOWN}, got {self.words[:1]}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("WordVocabulary: words must be unique")
        if self.max_words < 1:
            raise ValueError(f"WordVocabulary.max_words must be positive, got {self.max_words}")
        object.__setattr__(self, "_index", {word: i for i, word in enumerate(self.words)})

    @classmethod
    def build(cls, captions: Iterable[str | None], max_size: int | None = None,
              max_words: int = MAX_TEXT_EMBEDDINGS) -> WordVocabulary:
        """The words of `captions` (None and empty ones skipped), most frequent first, ties alphabetical; with
        max_size, only the max_size - 1 most frequent (the rest map to <unk>)."""
        counts = collections.Counter(word for caption in captions if caption for word in split_words(caption))
        counts.pop(UNKNOWN, None)
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"WordVocabulary.build: max_size must be positive, got {max_size}")
            ranked = ranked[:max_size - 1]
        return cls((UNKNOWN, *ranked), max_words)

    @property
    def size(self) -> int:
        return len(self.words)

    @property
    def text_size(self) -> int:
        return self.size

    def encode(self, caption: str) -> np.ndarray:
        """Word ids (n,) of a caption, unknown words as <unk>, at most max_words."""
        if not isinstance(caption, str):
            raise TypeError(f"caption: expected a string, got {type(caption).__name__}")
        return np.array([self._index.get(word, 0) for word in split_words(caption)[:self.max_words]], dtype=np.int64)

    def decode(self, tokens: Iterable[int]) -> str:
        tokens = [int(t) for t in tokens]
        bad = [t for t in tokens if not 0 <= t < self.size]
        if bad:
            raise ValueError(f"word ids {bad[:4]} are outside [0, {self.size})")
        return " ".join(self.words[t] for t in tokens)

    def condition(self, captions: Sequence[str]) -> list[TextCondition]:
        return [TextCondition(tokens=self.encode(caption)) for caption in captions]

    def to_json(self) -> str:
        return json.dumps({"words": list(self.words), "max_words": self.max_words}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> WordVocabulary:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError("word vocabulary JSON: expected an object with a list of words")
        return cls(tuple(data["words"]), data.get("max_words", MAX_TEXT_EMBEDDINGS))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        save_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordVocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"word vocabulary {path} does not exist")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError) as e:
            raise ValueError(f"word vocabulary {path}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Frozen encoder


class FrozenTextEncoder:
    """A frozen text encoder (in inference mode, parameters without gradients) and the word vocabulary that
    tokenizes for it."""

    text_size = 0

    def __init__(self, module: torch.nn.Module, words: WordVocabulary, max_positions: int = MAX_TEXT_EMBEDDINGS):
        if not 1 <= max_positions <= MAX_TEXT_EMBEDDINGS:
            raise ValueError(f"max_positions must be in [1, {MAX_TEXT_EMBEDDINGS}], got {max_positions}")
        self.module = module
        for param in module.parameters():
            param.requires_grad_(False)
        self.words, self.max_positions = words, max_positions
        probe = self._run(np.zeros((1, 1), dtype=np.int64))
        if probe.ndim != 3 or probe.shape[:2] != (1, 1):
            raise ValueError(f"text encoder: ids (1, 1) gave output {tuple(probe.shape)}, expected (1, 1, width)")
        self.width = probe.shape[2]

    @classmethod
    def load(cls, directory: str | Path, max_positions: int = MAX_TEXT_EMBEDDINGS) -> FrozenTextEncoder:
        directory = Path(directory)
        for name in (ENCODER_FILE, WORDS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"text encoder {directory}: no {name}")
        module = torch.export.load(directory / ENCODER_FILE).module()
        return cls(module, WordVocabulary.load(directory / WORDS_FILE), max_positions)

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are (the module may be moved, e.g. to a GPU); CPU for a weightless one."""
        for tensor in itertools.chain(self.module.parameters(), self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _run(self, ids: np.ndarray) -> Tensor:
        """Embeddings (B, n, width) of word ids (B, n), on the encoder's device."""
        ids_t = torch.from_numpy(ids).to(self.device)
        with torch.no_grad():
            return self.module(ids_t, torch.ones_like(ids_t, dtype=torch.bool)).float()

    def condition(self, captions: Sequence[str]) -> list[TextCondition]:
        conditions = []
        for caption in captions:
            tokens = self.words.encode(caption)[:self.max_positions]
            embeddings = self._run(tokens[None])[0] if len(tokens) else None
            conditions.append(TextCondition(embeddings=embeddings))
        return conditions


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TextConfig:
    kind: Literal["words", "encoder"] = "words"
    path: str = ""  # words: a vocabulary JSON (empty: build from the training captions); encoder: its directory
    max_size: int = 0  # words built from captions: at most this many, <unk> included (0: all)
    max_words: int = MAX_TEXT_EMBEDDINGS  # words (or encoder positions) kept per caption


def load_text_conditioner(cfg: TextConfig, captions: Iterable[str | None] = ()) -> WordVocabulary | FrozenTextEncoder:
    """The conditioner a config names; a word vocabulary without a path is built from `captions`."""
    if cfg.kind == "encoder":
        if not cfg.path:
            raise ValueError("text.kind = 'encoder' needs text.path, the encoder's directory")
        return FrozenTextEncoder.load(cfg.path, cfg.max_words)
    if cfg.path:
        return WordVocabulary.load(cfg.path)
    captions = list(captions)
    if not any(captions):
        raise ValueError("text.kind = 'words' without text.path needs captions to build the vocabulary from")
    return WordVocabulary.build(captions, cfg.max_size or None, cfg.max_words)
