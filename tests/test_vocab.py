import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.vocab import (
    NUM_RESOLUTIONS,
    NUM_SOURCES,
    NUM_SPECIAL,
    CodeError,
    Special,
    TaskToken,
    Vocabulary,
    VocabularyError,
    resolution_token,
    source_token,
)

vocabularies = st.builds(
    Vocabulary,
    video_codes=st.integers(1, 2**18),
    audio_levels=st.integers(1, 4),
    audio_codes=st.integers(1, 1024),
    text_size=st.integers(0, 300),
)
batch_shapes = hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3)


def test_paper_vocabulary():
    vocab = Vocabulary.paper()
    assert vocab.video_range == (256, 256 + 2**18)
    first_audio = 256 + 2**18
    assert [vocab.audio_range(level) for level in range(4)] == [
        (first_audio, first_audio + 1024),
        (first_audio + 1024, first_audio + 2048),
        (first_audio + 2048, first_audio + 3072),
        (first_audio + 3072, first_audio + 4096),
    ]
    assert vocab.size == 266_496
    assert "text" not in vocab.ranges()
    assert Vocabulary.paper(text_size=1000).text_range == (266_496, 267_496)


@settings(max_examples=200, deadline=None)
@given(vocabularies)
def test_ranges_tile_the_vocabulary(vocab):
    ranges = list(vocab.ranges().values())
    assert ranges[0] == (0, NUM_SPECIAL)
    assert ranges[-1][1] == vocab.size
    assert all(low < high for low, high in ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert len(ranges) == 2 + vocab.audio_levels + (1 if vocab.text_size else 0)


def test_special_tokens_are_distinct_and_named():
    ids = [int(t) for t in Special] + [int(t) for t in TaskToken]
    ids += [source_token(i) for i in range(NUM_SOURCES)] + [resolution_token(i) for i in range(NUM_RESOLUTIONS)]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < NUM_SPECIAL for i in ids)
    paper = "<bos> <bot_i> <eot_i> <bov_i> <eov_i> <boa_i> <eoa_i> <bov_o> <eov_o> <boa_o> <eoa_o> <eos>".split()
    assert set(paper) <= {t.token for t in Special}
    # The masked conditioning copy stays one contiguous range: <mask> sits right below the first video id.
    assert Special.MASK + 1 == Vocabulary.paper().video_offset
    with pytest.raises(VocabularyError, match="source index 64"):
        source_token(NUM_SOURCES)
    with pytest.raises(VocabularyError, match="resolution index -1"):
        resolution_token(-1)


@settings(max_examples=100, deadline=None)
@given(st.data(), vocabularies, batch_shapes)
def test_video_round_trip(data, vocab, shape):
    codes = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, vocab.video_codes - 1)))
    ids = vocab.video_to_unified(codes)
    low, high = vocab.video_range
    assert ids.dtype == np.int64 and ids.shape == codes.shape
    assert ((ids >= low) & (ids < high)).all()
    np.testing.assert_array_equal(vocab.video_to_local(ids), codes)


@settings(max_examples=100, deadline=None)
@given(st.data(), vocabularies, batch_shapes)
def test_audio_levels_use_their_own_ranges(data, vocab, batch):
    frames = data.draw(st.integers(1, 5))
    shape = (*batch, vocab.audio_levels, frames)
    codes = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(0, vocab.audio_codes - 1)))
    ids = vocab.audio_to_unified(codes)
    reference = np.empty(shape, dtype=np.int64)
    for index in np.ndindex(*shape):
        level = index[-2]
        reference[index] = NUM_SPECIAL + vocab.video_codes + level * vocab.audio_codes + codes[index]
    np.testing.assert_array_equal(ids, reference)
    for level in range(vocab.audio_levels):
        low, high = vocab.audio_range(level)
        assert ((ids[..., level, :] >= low) & (ids[..., level, :] < high)).all()
    np.testing.assert_array_equal(vocab.audio_to_local(ids), codes)


@settings(max_examples=50, deadline=None)
@given(st.data(), vocabularies.filter(lambda v: v.text_size > 0))
def test_text_round_trip(data, vocab):
    tokens = data.draw(hnp.arrays(np.int64, st.integers(1, 8), elements=st.integers(0, vocab.text_size - 1)))
    ids = vocab.text_to_unified(tokens)
    assert ((ids >= vocab.text_offset) & (ids < vocab.size)).all()
    np.testing.assert_array_equal(vocab.text_to_local(ids), tokens)


def test_bad_codes_are_named():
    vocab = Vocabulary(video_codes=1024, audio_levels=2, audio_codes=64, text_size=10)
    with pytest.raises(CodeError, match=r"video codes: 1 of 4 .*first 1024 at index \(1, 1\), expected \[0, 1024\)"):
        vocab.video_to_unified(np.array([[0, 5], [7, 1024]]))
    with pytest.raises(CodeError, match="first -1"):
        vocab.video_to_unified(np.array([-1]))
    with pytest.raises(CodeError, match="expected integer codes, got dtype float32"):
        vocab.video_to_unified(np.zeros(3, dtype=np.float32))
    with pytest.raises(CodeError, match="dtype bool"):
        vocab.video_to_unified(np.zeros(3, dtype=bool))
    with pytest.raises(CodeError, match=r"audio codes: expected shape \(\.\.\., 2 levels, frames\), got \(3, 5\)"):
        vocab.audio_to_unified(np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(CodeError, match="first 64 at index"):
        vocab.audio_to_unified(np.array([[0, 1], [2, 64]]))
    # A level-0 id is not a valid level-1 id.
    level0 = vocab.audio_range(0)[0]
    with pytest.raises(CodeError, match=r"audio ids: .*index \(1, 0\)"):
        vocab.audio_to_local(np.array([[level0], [level0]]))
    with pytest.raises(CodeError, match="video ids"):
        vocab.video_to_local(np.array([vocab.audio_range(0)[0]]))
    with pytest.raises(CodeError, match="text tokens: 1 of 1 .*first 10"):
        vocab.text_to_unified(np.array([10]))
    with pytest.raises(CodeError, match="no text range"):
        Vocabulary(16, 1, 4).text_to_unified(np.array([0]))


def test_invalid_vocabulary():
    with pytest.raises(VocabularyError, match="video_codes must be a positive int, got 0"):
        Vocabulary(0, 4, 1024)
    with pytest.raises(VocabularyError, match="audio_levels"):
        Vocabulary(16, True, 4)
    with pytest.raises(VocabularyError, match="text_size must be a non-negative int"):
        Vocabulary(16, 1, 4, -1)
    with pytest.raises(VocabularyError, match="audio level 4"):
        Vocabulary.paper().audio_range(4)


def test_describe():
    vocab = Vocabulary(video_codes=1024, audio_levels=2, audio_codes=64, text_size=10)
    assert vocab.describe(Special.BOV_O) == "<bov_o>"
    assert vocab.describe(TaskToken.STYLIZE) == "<task:stylize>"
    assert vocab.describe(source_token(3)) == "<source:3>"
    assert vocab.describe(resolution_token(1)) == "<res:1>"
    assert vocab.describe(200) == "unassigned special id 200"
    assert vocab.describe(256 + 5) == "video code 5 (id 261)"
    assert vocab.describe(vocab.audio_range(1)[0] + 2) == f"audio level 1 code 2 (id {vocab.audio_range(1)[0] + 2})"
    assert vocab.describe(vocab.text_offset) == f"text token 0 (id {vocab.text_offset})"
    assert "outside the vocabulary" in vocab.describe(vocab.size)
