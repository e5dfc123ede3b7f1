import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.sequence import (
    MAX_TEXT_EMBEDDINGS,
    TASKS,
    Layout,
    MalformedSequenceError,
    ModalityError,
    SequenceError,
    ShapeError,
    Task,
    build_prompt,
    build_sequence,
    central_mask,
    parse_sequence,
)
from pipeline.vocab import NUM_RESOLUTIONS, NUM_SOURCES, CodeError, Special, Vocabulary, resolution_token, source_token

small_vocabularies = st.builds(
    Vocabulary,
    video_codes=st.integers(1, 1024),
    audio_levels=st.integers(1, 4),
    audio_codes=st.integers(1, 64),
    text_size=st.integers(0, 50),
)
EXAMPLES = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw, task: Task):
    """A vocabulary and build_sequence arguments for `task`, tiny shapes, every optional condition sometimes."""
    spec = TASKS[task]
    vocab = draw(small_vocabularies)

    def codes(shape, high):
        return draw(hnp.arrays(np.int64, shape, elements=st.integers(0, high - 1)))

    t = 1 if spec.video_out == "image" else draw(st.integers(2 if spec.video_in == "context" else 1, 4))
    shape = (t, draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kwargs = {"video": codes(shape, vocab.video_codes)}
    if spec.text == "required" or (spec.text == "optional" and draw(st.booleans())):
        if vocab.text_size and draw(st.booleans()):
            kwargs["text"] = codes((draw(st.integers(1, 6)),), vocab.text_size)
        else:
            kwargs["text_embeddings"] = draw(st.integers(1, MAX_TEXT_EMBEDDINGS))
    if spec.uses_audio:
        frames = draw(st.integers(2 if spec.audio_in == "context" else 1, 6))
        kwargs["audio"] = codes((vocab.audio_levels, frames), vocab.audio_codes)
        if spec.audio_in == "context":
            kwargs["context_audio_frames"] = draw(st.integers(1, frames - 1))
    if spec.video_in == "context":
        kwargs["context_frames"] = draw(st.integers(1, t - 1))
    if spec.video_in == "masked":
        mask = draw(hnp.arrays(np.bool_, shape))
        mask[tuple(draw(st.integers(0, n - 1)) for n in shape)] = True
        kwargs["mask"] = mask
    if spec.video_in == "structure":
        kwargs["structure"] = codes(shape, vocab.video_codes)
    kwargs["source"] = draw(st.integers(0, NUM_SOURCES - 1))
    kwargs["resolution"] = draw(st.integers(0, NUM_RESOLUTIONS - 1))
    return vocab, kwargs


def reference_ids(task: Task, vocab: Vocabulary, kw: dict) -> list[int]:
    """The layout of paper Fig. 2 written out by hand, one task at a time, with Python loops."""
    video, audio = kw["video"], kw.get("audio")
    k, ka = kw.get("context_frames", 0), kw.get("context_audio_frames", 0)

    def v(codes):
        return [vocab.video_offset + int(c) for frame in codes for row in frame for c in row]

    def a(codes):
        return [vocab.audio_range(level)[0] + int(c) for level, row in enumerate(codes) for c in row]

    def bracket(begin, body, end):
        return [begin, *body, end]

    task_token = {
        Task.FUTURE_PREDICTION: "CONTINUATION", Task.AUDIO_VIDEO_CONTINUATION: "CONTINUATION",
        Task.INPAINTING: "INPAINT", Task.OUTPAINTING: "OUTPAINT", Task.STYLIZATION: "STYLIZE",
        Task.VIDEO_TO_AUDIO: "AUDIO",
    }.get(task, "VIDEO")
    ids = [Special.BOS, TASKS[task].token]
    assert TASKS[task].token.name == task_token
    if "text" in kw:
        ids += bracket(Special.BOT_I, [vocab.text_offset + int(x) for x in kw["text"]], Special.EOT_I)
    if kw.get("text_embeddings"):
        ids += bracket(Special.BOT_I, [Special.TEXT_EMBEDDING] * kw["text_embeddings"], Special.EOT_I)
    if task in (Task.FUTURE_PREDICTION, Task.AUDIO_VIDEO_CONTINUATION):
        ids += bracket(Special.BOV_I, v(video[:k]), Special.EOV_I)
    if task == Task.AUDIO_VIDEO_CONTINUATION:
        ids += bracket(Special.BOA_I, a(audio[:, :ka]), Special.EOA_I)
    if task == Task.IMAGE_TO_VIDEO:
        ids += bracket(Special.BOV_I, v(video[:1]), Special.EOV_I)
    if task in (Task.INPAINTING, Task.OUTPAINTING):
        masked = [Special.MASK if hidden else i for i, hidden in zip(v(video), kw["mask"].ravel())]
        ids += bracket(Special.BOV_I, masked, Special.EOV_I)
    if task == Task.STYLIZATION:
        ids += bracket(Special.BOV_I, v(kw["structure"]), Special.EOV_I)
    if task == Task.VIDEO_TO_AUDIO:
        ids += bracket(Special.BOV_I, v(video), Special.EOV_I)
    if task == Task.AUDIO_TO_VIDEO:
        ids += bracket(Special.BOA_I, a(audio), Special.EOA_I)
    ids += [source_token(kw["source"]), resolution_token(kw["resolution"])]
    if task == Task.TEXT_TO_IMAGE:
        return [*ids, Special.BOV_O, *v(video)]
    if task == Task.VIDEO_TO_AUDIO:
        return [*ids, *bracket(Special.BOA_O, a(audio), Special.EOA_O), Special.EOS]
    ids += bracket(Special.BOV_O, v(video[k:]), Special.EOV_O)
    if task == Task.AUDIO_VIDEO_CONTINUATION:
        ids += bracket(Special.BOA_O, a(audio[:, ka:]), Special.EOA_O)
    return [*ids, Special.EOS]


def assert_same(actual, expected):
    if expected is None:
        assert actual is None
    else:
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("task", list(Task))
@EXAMPLES
@given(data=st.data())
def test_build_matches_the_reference_layout(task, data):
    vocab, kw = data.draw(cases(task))
    seq = build_sequence(task, vocab, **kw)
    assert seq.ids.dtype == np.int64
    assert seq.ids.tolist() == [int(i) for i in reference_ids(task, vocab, kw)]


@pytest.mark.parametrize("task", list(Task))
@EXAMPLES
@given(data=st.data())
def test_build_then_parse_returns_the_inputs(task, data):
    vocab, kw = data.draw(cases(task))
    seq = build_sequence(task, vocab, **kw)
    parsed = parse_sequence(seq.ids, seq.layout)
    assert_same(parsed.video, kw["video"])
    assert_same(parsed.audio, kw.get("audio"))
    assert_same(parsed.text, kw.get("text"))
    assert parsed.text_embeddings == kw.get("text_embeddings", 0)
    assert_same(parsed.mask, kw.get("mask"))
    assert_same(parsed.structure, kw.get("structure"))
    # The layout can also be read off the sequence itself, given only the latent frame size.
    assert Layout.from_ids(task, vocab, seq.ids, kw["video"].shape[1:]) == seq.layout


@pytest.mark.parametrize("task", list(Task))
@EXAMPLES
@given(data=st.data())
def test_ids_lie_in_their_valid_ranges(task, data):
    vocab, kw = data.draw(cases(task))
    seq = build_sequence(task, vocab, **kw)
    low, high = seq.layout.valid_ranges()
    assert low.shape == high.shape == seq.ids.shape
    assert ((0 <= low) & (low < high) & (high <= vocab.size)).all()
    assert ((seq.ids >= low) & (seq.ids < high)).all()
    # Output positions admit exactly one modality's range, or exactly one special token.
    ranges = set(vocab.ranges().values()) - {(0, 256)}
    out = slice(seq.prefix_length, None)
    for lo, hi in zip(low[out].tolist(), high[out].tolist()):
        assert (lo, hi) in ranges or (hi - lo == 1 and lo < 256)


@pytest.mark.parametrize("task", list(Task))
@EXAMPLES
@given(data=st.data())
def test_prefix_loss_mask_and_text_positions(task, data):
    vocab, kw = data.draw(cases(task))
    seq = build_sequence(task, vocab, **kw)
    ids, p = seq.ids, seq.prefix_length
    np.testing.assert_array_equal(seq.loss_mask, np.arange(len(ids)) >= p)
    assert ids[0] == Special.BOS and ids[1] == TASKS[task].token
    assert ids[p - 1] == (Special.BOA_O if task == Task.VIDEO_TO_AUDIO else Special.BOV_O)
    assert not np.isin(ids[:p - 1], [Special.BOV_O, Special.BOA_O, Special.EOS]).any()
    assert (ids[-1] == Special.EOS) == (task != Task.TEXT_TO_IMAGE)
    m = kw.get("text_embeddings", 0)
    np.testing.assert_array_equal(seq.text_embedding_positions, np.arange(3, 3 + m))
    if m:
        assert ids[2] == Special.BOT_I
    assert (ids == Special.TEXT_EMBEDDING).sum() == m
    prompt = build_prompt(seq.layout, text=kw.get("text"), video=visual_condition(task, kw),
                          audio=audio_condition(task, kw), mask=kw.get("mask"))
    np.testing.assert_array_equal(prompt, ids[:p])


def visual_condition(task, kw):
    video = kw["video"]
    return {
        Task.FUTURE_PREDICTION: video[:kw.get("context_frames")], Task.IMAGE_TO_VIDEO: video[:1],
        Task.INPAINTING: video, Task.OUTPAINTING: video, Task.STYLIZATION: kw.get("structure"),
        Task.VIDEO_TO_AUDIO: video, Task.AUDIO_VIDEO_CONTINUATION: video[:kw.get("context_frames")],
    }.get(task)


def audio_condition(task, kw):
    if task == Task.AUDIO_TO_VIDEO:
        return kw["audio"]
    if task == Task.AUDIO_VIDEO_CONTINUATION:
        return kw["audio"][:, :kw["context_audio_frames"]]
    return None


@EXAMPLES
@given(data=st.data())
def test_text_to_image_is_a_prefix_of_text_to_video(data):
    vocab, kw = data.draw(cases(Task.TEXT_TO_VIDEO))
    image_kw = {**kw, "video": kw["video"][:1]}
    image = build_sequence(Task.TEXT_TO_IMAGE, vocab, **image_kw)
    video = build_sequence(Task.TEXT_TO_VIDEO, vocab, **kw)
    n = len(image.ids)
    np.testing.assert_array_equal(video.ids[:n], image.ids)
    assert image.prefix_length == video.prefix_length
    for image_range, video_range in zip(image.layout.valid_ranges(), video.layout.valid_ranges()):
        np.testing.assert_array_equal(video_range[:n], image_range)


def test_missing_modality_drops_its_tokens():
    vocab = Vocabulary(video_codes=64, audio_levels=2, audio_codes=8, text_size=20)
    video = np.arange(2 * 2 * 3).reshape(2, 2, 3)
    with_text = build_sequence(Task.IMAGE_TO_VIDEO, vocab, video, text=np.array([1, 2, 3]))
    without = build_sequence(Task.IMAGE_TO_VIDEO, vocab, video)
    assert len(with_text.ids) == len(without.ids) + 5
    assert not np.isin(without.ids, [Special.BOT_I, Special.EOT_I]).any()
    np.testing.assert_array_equal(with_text.ids[7:], without.ids[2:])
    assert not np.isin(without.ids, [Special.BOA_I, Special.EOA_I, Special.BOA_O, Special.EOA_O]).any()


def test_paper_token_counts():
    vocab = Vocabulary.paper()
    rng = np.random.default_rng(0)
    # 17 frames of 128x128 through MAGVIT-v2 (first frame alone, then 4x temporal; 8x spatial).
    grid = (1 + (17 - 1) // 4, 128 // 8, 128 // 8)
    video = rng.integers(0, 2**18, grid)
    t2v = build_sequence(Task.TEXT_TO_VIDEO, vocab, video, text_embeddings=64)
    assert t2v.layout.span("output video").stop - t2v.layout.span("output video").start == 1280
    assert len(t2v.ids) == 2 + 66 + 2 + 1 + 1280 + 2
    assert t2v.prefix_length == 71 and t2v.loss_mask.sum() == 1282
    wide = Layout(Task.TEXT_TO_VIDEO, vocab, (5, 128 // 8, 224 // 8), text_embeddings=64)
    assert wide.output_video_shape == (5, 16, 28) and wide.length - len(t2v.ids) == 2240 - 1280
    t2i = build_sequence(Task.TEXT_TO_IMAGE, vocab, video[:1], text_embeddings=64)
    assert t2i.loss_mask.sum() == 256
    np.testing.assert_array_equal(t2i.ids, t2v.ids[:len(t2i.ids)])
    # 2.125 s of audio: 106 frames x 4 levels = 424 tokens, a whole level at a time, coarse to fine.
    audio = rng.integers(0, 1024, (4, 106))
    v2a = build_sequence(Task.VIDEO_TO_AUDIO, vocab, video, audio=audio)
    span = v2a.layout.span("output audio")
    assert span.stop - span.start == 424
    out = v2a.ids[span]
    for level in range(4):
        np.testing.assert_array_equal(out[106 * level:106 * (level + 1)], vocab.audio_range(level)[0] + audio[level])
    assert v2a.ids[span.stop:].tolist() == [Special.EOA_O, Special.EOS]


def test_central_masks():
    mask = central_mask((2, 4, 6))
    assert mask.shape == (2, 4, 6) and mask.sum() == 2 * 2 * 3
    assert mask[:, 1:3, 1:4].all()
    vocab = Vocabulary(64, 1, 8)
    video = np.ones((2, 4, 6), dtype=np.int64)
    inner = build_sequence(Task.INPAINTING, vocab, video, mask=mask)
    outer = build_sequence(Task.OUTPAINTING, vocab, video, mask=~mask)
    span = inner.layout.span("input video")
    assert (inner.ids[span] == Special.MASK).sum() == 12 and (outer.ids[span] == Special.MASK).sum() == 36
    with pytest.raises(ValueError, match="fraction"):
        central_mask((1, 2, 2), 1.0)


VOCAB = Vocabulary(video_codes=32, audio_levels=2, audio_codes=8, text_size=10)
VIDEO = np.zeros((3, 2, 2), dtype=np.int64)
AUDIO = np.zeros((2, 5), dtype=np.int64)
TEXT = np.array([1, 2])


@pytest.mark.parametrize("task, kwargs, error, message", [
    (Task.TEXT_TO_VIDEO, {"video": VIDEO + 32, "text": TEXT}, CodeError, r"text_to_video: video: .*first 32"),
    (Task.VIDEO_TO_AUDIO, {"video": VIDEO, "audio": AUDIO + [[0], [8]]}, CodeError,
     r"video_to_audio: audio: .*\(1, 0\)"),
    (Task.STYLIZATION, {"video": VIDEO, "text": TEXT, "structure": VIDEO - 1}, CodeError,
     "stylization: structure video"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO, "text": np.array([10])}, CodeError, "text_to_video: text: .*first 10"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO.astype(float), "text": TEXT}, CodeError, "dtype float64"),
    (Task.UNCONDITIONAL, {"video": VIDEO[0]}, ShapeError, r"unconditional: video must be a non-empty 3-d array"),
    (Task.UNCONDITIONAL, {"video": VIDEO[:0]}, ShapeError, "non-empty"),
    (Task.TEXT_TO_IMAGE, {"video": VIDEO, "text": TEXT}, ShapeError, "text_to_image: an image is one latent frame"),
    (Task.FUTURE_PREDICTION, {"video": VIDEO}, ShapeError, r"future_prediction: context_frames must be in \[1, 3\)"),
    (Task.FUTURE_PREDICTION, {"video": VIDEO, "context_frames": 3}, ShapeError, "got 3"),
    (Task.UNCONDITIONAL, {"video": VIDEO, "context_frames": 1}, ShapeError, "unconditional: takes no context_frames"),
    (Task.AUDIO_VIDEO_CONTINUATION, {"video": VIDEO, "audio": AUDIO, "context_frames": 1, "context_audio_frames": 5},
     ShapeError, r"context_audio_frames must be in \[1, 5\)"),
    (Task.AUDIO_TO_VIDEO, {"video": VIDEO, "audio": AUDIO[:1]}, ShapeError, r"audio must be \(2 levels"),
    (Task.INPAINTING, {"video": VIDEO, "mask": np.ones((2, 2), bool)}, ShapeError, r"mask .* has shape \(2, 2\)"),
    (Task.INPAINTING, {"video": VIDEO, "mask": np.ones((3, 2, 2), int)}, ShapeError, "mask must be boolean"),
    (Task.OUTPAINTING, {"video": VIDEO, "mask": np.zeros((3, 2, 2), bool)}, ShapeError, "outpainting: mask hides"),
    (Task.STYLIZATION, {"video": VIDEO, "text": TEXT, "structure": VIDEO[:2]}, ShapeError, "structure video has shape"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO, "text_embeddings": 65}, ShapeError, "at most 64"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO, "text": TEXT, "text_embeddings": 2}, ShapeError, "either tokens or"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO}, ModalityError, "text_to_video: needs text"),
    (Task.STYLIZATION, {"video": VIDEO, "text": TEXT}, ModalityError, "stylization: needs structure video"),
    (Task.UNCONDITIONAL, {"video": VIDEO, "text": TEXT}, ModalityError, "unconditional: takes no text"),
    (Task.TEXT_TO_VIDEO, {"video": VIDEO, "text": TEXT, "audio": AUDIO}, ModalityError, "takes no audio"),
    (Task.VIDEO_TO_AUDIO, {"video": VIDEO}, ModalityError, "video_to_audio: needs audio"),
    (Task.AUDIO_TO_VIDEO, {"video": None, "audio": AUDIO}, ModalityError, "audio_to_video: needs video"),
    (Task.INPAINTING, {"video": VIDEO}, ModalityError, r"inpainting: needs mask"),
    (Task.FUTURE_PREDICTION, {"video": VIDEO, "context_frames": 1, "mask": VIDEO > 0}, ModalityError, "takes no mask"),
    (Task.IMAGE_TO_VIDEO, {"video": VIDEO, "structure": VIDEO}, ModalityError, "takes no structure"),
    (Task.UNCONDITIONAL, {"video": VIDEO, "source": NUM_SOURCES}, SequenceError, "source index 64"),
])
def test_build_errors_name_the_task_and_the_problem(task, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_sequence(task, VOCAB, **kwargs)


def test_text_tokens_need_a_text_range():
    with pytest.raises(ModalityError, match="text_size > 0"):
        build_sequence(Task.TEXT_TO_VIDEO, Vocabulary(32, 2, 8), VIDEO, text=TEXT)


def test_prompt_errors():
    layout = Layout(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, (3, 2, 2), (2, 5), text_tokens=2, context_frames=1,
                    context_audio_frames=2)
    with pytest.raises(ModalityError, match="audio_video_continuation: needs text tokens"):
        build_prompt(layout, video=VIDEO[:1], audio=AUDIO[:, :2])
    with pytest.raises(ShapeError, match=r"a video condition has shape \(3, 2, 2\), expected \(1, 2, 2\)"):
        build_prompt(layout, text=TEXT, video=VIDEO, audio=AUDIO[:, :2])
    with pytest.raises(CodeError, match="audio condition"):
        build_prompt(layout, text=TEXT, video=VIDEO[:1], audio=AUDIO[:, :2] + 8)
    assert len(build_prompt(layout, text=TEXT, video=VIDEO[:1], audio=AUDIO[:, :2])) == layout.prefix_length


def continuation():
    video = np.arange(12).reshape(3, 2, 2) % 32
    return build_sequence(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, video, audio=AUDIO + 1, text=TEXT, context_frames=1,
                          context_audio_frames=2)


def test_parse_rejects_misplaced_ids():
    seq = continuation()
    layout, ids = seq.layout, seq.ids
    with pytest.raises(MalformedSequenceError, match="audio_video_continuation: expected 39 ids .*got 38"):
        parse_sequence(ids[:-1], layout)
    broken = ids.copy()
    broken[layout.span("output audio").start] = VOCAB.video_offset
    expected = r"\(output audio level 0\): expected an id in .*found video code 0"
    with pytest.raises(MalformedSequenceError, match=expected):
        parse_sequence(broken, layout)
    broken = ids.copy()
    broken[layout.span("output video").stop] = Special.EOS
    with pytest.raises(MalformedSequenceError, match="expected <eov_o>, found <eos>"):
        parse_sequence(broken, layout)
    level1 = layout.span("input audio").start + 2
    broken = ids.copy()
    broken[level1] = VOCAB.audio_range(0)[0]
    with pytest.raises(MalformedSequenceError, match="input audio level 1"):
        parse_sequence(broken, layout)
    with pytest.raises(MalformedSequenceError, match="1-d integer"):
        parse_sequence(ids.astype(float), layout)


def test_layout_from_ids_rejects_broken_structure():
    seq = continuation()
    ids = seq.ids
    bov_o, eov_o = (int(np.flatnonzero(ids == token)[0]) for token in (Special.BOV_O, Special.EOV_O))
    with pytest.raises(MalformedSequenceError, match="<eos> appears 2 times"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, np.where(ids == Special.EOV_O, Special.EOS, ids), (2, 2))
    with pytest.raises(MalformedSequenceError, match=r"expected <bov_o> \.\.\. <eov_o>"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, np.delete(ids, eov_o), (2, 2))
    with pytest.raises(MalformedSequenceError, match="not a whole number of 4-id units"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, np.delete(ids, eov_o - 1), (2, 2))
    with pytest.raises(MalformedSequenceError, match="not a whole number of 3-id units"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, ids, (1, 3))
    with pytest.raises(MalformedSequenceError, match="expected <source> <res>"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, np.delete(ids, bov_o - 1), (2, 2))
    # Read as another task's sequence, its delimiters do not fit.
    with pytest.raises(MalformedSequenceError, match="unconditional: takes no text"):
        Layout.from_ids(Task.UNCONDITIONAL, VOCAB, ids, (2, 2))
    with pytest.raises(ShapeError, match=r"latent \(h, w\) of one frame, got \(0, 2\)"):
        Layout.from_ids(Task.AUDIO_VIDEO_CONTINUATION, VOCAB, ids, (0, 2))
    # A text-to-image sequence has no end tokens: its image runs to the end, and must be exactly one frame.
    image = build_sequence(Task.TEXT_TO_IMAGE, VOCAB, VIDEO[:1], text=TEXT)
    assert Layout.from_ids(Task.TEXT_TO_IMAGE, VOCAB, image.ids, (2, 2)) == image.layout
    with pytest.raises(MalformedSequenceError, match="an image is one latent frame"):
        Layout.from_ids(Task.TEXT_TO_IMAGE, VOCAB, np.concatenate([image.ids, image.ids[-4:]]), (2, 2))
