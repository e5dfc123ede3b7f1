import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sampling import generate
from pipeline.sequence import Layout, Task, build_prompt, build_sequence, parse_sequence
from pipeline.synth import caption as synth_caption
from pipeline.text import (
    UNKNOWN,
    FrozenTextEncoder,
    TextCondition,
    TextConfig,
    WordVocabulary,
    check_fits,
    load_text_conditioner,
    split_words,
    stack_embeddings,
)
from pipeline.vocab import Vocabulary

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
DEBUG = load_config(LLMConfig, "debug", kind="llm")


@pytest.fixture(scope="module")
def captions() -> list[str | None]:
    path = CORPUS / "captions.jsonl"
    if not path.is_file():
        pytest.skip(f"the real corpus is missing: {path}")
    return [json.loads(line).get("caption") for line in path.read_text().splitlines() if line.strip()]


class TinyEncoder(nn.Module):
    """A random stand-in for a T5 encoder: embedding, one transformer layer, width 16."""

    def __init__(self, words: int, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(words, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.1, batch_first=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(ids), src_key_padding_mask=~mask)


@pytest.fixture
def encoder_dir(tmp_path, captions):
    words = WordVocabulary.build(captions)
    torch.manual_seed(0)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    dims = {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("n", max=64)}
    program = torch.export.export(TinyEncoder(words.size).eval(), (ids, mask), dynamic_shapes=(dims, dims))
    torch.export.save(program, tmp_path / "encoder.pt2")
    words.save(tmp_path / "words.json")
    return tmp_path


def test_vocabulary_from_the_real_captions(captions):
    vocab = WordVocabulary.build(captions)
    # Reference: count with str.split after stripping punctuation, rank by (-count, word).
    counts = collections.Counter(w.strip(".,!?;:\"()").lower() for c in captions if c for w in c.split())
    counts.pop("", None)
    assert vocab.words == (UNKNOWN, *sorted(counts, key=lambda w: (-counts[w], w)))
    assert vocab.words[1] == "a"  # the most frequent word
    # Deterministic: caption order does not matter.
    shuffled = list(captions)
    random.Random(0).shuffle(shuffled)
    assert WordVocabulary.build(shuffled) == vocab
    assert WordVocabulary.build(captions, max_size=5).words == vocab.words[:5]


def test_encode_and_decode(captions):
    vocab = WordVocabulary.build(captions)
    first = next(c for c in captions if c)
    tokens = vocab.encode(first)
    assert tokens.dtype == np.int64 and vocab.decode(tokens) == " ".join(split_words(first))
    assert vocab.encode("A pancake, soaring over zanzibar!").tolist() == [vocab.words.index("a"),
                                                                         vocab.words.index("pancake"), 0, 0, 0]
    assert vocab.encode("").size == 0
    assert len(WordVocabulary(vocab.words, max_words=3).encode(first)) == 3
    with pytest.raises(ValueError, match=r"word ids \[9999\] are outside"):
        vocab.decode([9999])
    with pytest.raises(TypeError, match="caption: expected a string"):
        vocab.encode(None)


def test_json_round_trip_and_errors(tmp_path, captions):
    vocab = WordVocabulary.build(captions, max_words=12)
    assert WordVocabulary.load(vocab.save(tmp_path / "words.json")) == vocab
    (tmp_path / "bad.json").write_text(json.dumps({"words": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"bad.json: WordVocabulary: the first word must be <unk>"):
        WordVocabulary.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        WordVocabulary.load(tmp_path / "missing.json")


def test_words_land_in_the_vocabulary_text_range(captions):
    words = WordVocabulary.build(captions)
    vocab = Vocabulary(256, 2, 64, text_size=words.size)
    check_fits(words, vocab, text_width=0)
    condition = words.condition(["a man in a kitchen"])[0]
    seq = build_sequence(Task.TEXT_TO_VIDEO, vocab, np.zeros((1, 2, 2), np.int64), **condition.sequence_kwargs())
    np.testing.assert_array_equal(seq.ids[seq.layout.span("text")], vocab.text_offset + condition.tokens)
    assert words.decode(parse_sequence(seq.ids, seq.layout).text) == "a man in a kitchen"
    assert words.condition([""])[0].sequence_kwargs() == {}
    with pytest.raises(ValueError, match=f"needs {words.size} word ids but the vocabulary's text range holds 32"):
        check_fits(words, DEBUG.vocab, DEBUG.text_width)


def test_synthetic_world_fits_the_demo_vocabulary():
    demo = load_config(LLMConfig, "demo", kind="llm")
    captions = [synth_caption({"shape": s, "color": c, "motion": m})
                for s in ("circle", "square", "triangle") for c in ("red", "green", "blue", "yellow")
                for m in ("left", "right", "up", "down")]
    check_fits(WordVocabulary.build(captions), demo.vocab, demo.text_width)


def test_frozen_encoder(encoder_dir):
    encoder = FrozenTextEncoder.load(encoder_dir, max_positions=4)
    assert encoder.width == 16 and encoder.text_size == 0
    assert not any(p.requires_grad for p in encoder.module.parameters())
    short, long, empty = encoder.condition(["a fire", "a man in a bowler hat on a sidewalk", ""])
    assert short.embeddings.shape == (2, 16) and long.embeddings.shape == (4, 16) and len(empty) == 0
    assert short.sequence_kwargs() == {"text_embeddings": 2} and empty.sequence_kwargs() == {}
    # Frozen and in eval mode: the same caption gives the same embeddings (dropout off).
    torch.testing.assert_close(encoder.condition(["a fire"])[0].embeddings, short.embeddings)
    batch = stack_embeddings([short, long, empty])
    assert batch.shape == (3, 4, 16)
    torch.testing.assert_close(batch[0, :2], short.embeddings)
    assert (batch[0, 2:] == 0).all() and (batch[2] == 0).all()
    assert stack_embeddings([TextCondition(tokens=np.array([1]))]) is None


def test_frozen_encoder_conditions_the_llm(encoder_dir):
    encoder = FrozenTextEncoder.load(encoder_dir)
    check_fits(encoder, DEBUG.vocab, DEBUG.text_width)
    conditions = encoder.condition(["a fire burning inside a wood stove", "color bars"])
    video = np.zeros((1, 2, 2), np.int64)
    seqs = [build_sequence(Task.TEXT_TO_VIDEO, DEBUG.vocab, video, **c.sequence_kwargs()) for c in conditions]
    torch.manual_seed(0)
    model = VideoPoetLM(DEBUG)
    ids = torch.zeros(2, max(len(s.ids) for s in seqs), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s.ids)], mask[i, :len(s.ids)] = torch.from_numpy(s.ids), torch.from_numpy(s.loss_mask)
    loss, _ = model.loss(ids, torch.tensor([s.prefix_length for s in seqs]), mask, stack_embeddings(conditions))
    loss.backward()
    assert model.text_proj.weight.grad.abs().sum() > 0
    layout = seqs[0].layout
    out = generate(model.eval(), layout, build_prompt(layout), text_embeddings=conditions[0].embeddings,
                   guidance=2.0)
    parse_sequence(out[0], layout)


def test_frozen_encoder_errors(tmp_path, encoder_dir):
    with pytest.raises(FileNotFoundError, match="no encoder.pt2"):
        FrozenTextEncoder.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"max_positions must be in \[1, 64\]"):
        FrozenTextEncoder.load(encoder_dir, max_positions=65)
    with pytest.raises(ValueError, match=r"text embeddings have width 16 but the model projects width 8"):
        check_fits(FrozenTextEncoder.load(encoder_dir), DEBUG.vocab, 8)


def test_load_text_conditioner(tmp_path, captions, encoder_dir):
    built = load_text_conditioner(TextConfig(max_size=6), captions)
    assert isinstance(built, WordVocabulary) and built.size == 6
    path = built.save(tmp_path / "words.json")
    assert load_text_conditioner(TextConfig(path=str(path))) == built
    assert isinstance(load_text_conditioner(TextConfig(kind="encoder", path=str(encoder_dir))), FrozenTextEncoder)
    with pytest.raises(ValueError, match="needs captions"):
        load_text_conditioner(TextConfig())
    with pytest.raises(ValueError, match="needs text.path"):
        load_text_conditioner(TextConfig(kind="encoder"))


def test_layout_accepts_encoder_positions_up_to_64():
    layout = Layout(Task.TEXT_TO_VIDEO, DEBUG.vocab, (1, 2, 2), text_embeddings=64)
    assert len(layout.text_embedding_positions()) == 64
