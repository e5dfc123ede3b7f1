import numpy as np
import pytest

from pipeline.sequence import Task, parse_sequence
from pipeline.vocab import Vocabulary
from pipeline.text import WordVocabulary
from train.mixture import Mixture, MixtureConfig, Row, collate, rows_from_table

VOCAB = Vocabulary(video_codes=256, audio_levels=2, audio_codes=32, text_size=16)
WORDS = WordVocabulary.build([f"a red circle {i}" for i in range(6)])


def make_rows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(Row(video=rng.integers(0, 256, (3, 2, 2)),
                        audio=rng.integers(0, 32, (2, 50)) if i % 3 else None,
                        structure=rng.integers(0, 256, (3, 2, 2)) if i % 2 else None,
                        caption=None if i == 0 else f"a red circle {i}"))
    return rows


def test_every_task_builds_and_parses():
    mixture = Mixture(MixtureConfig(condition_dropout=0.0), VOCAB, WORDS, steps=100)
    rng = np.random.default_rng(0)
    for task in Task:
        row = next(r for r in make_rows() if mixture.lacks(task, r) is None)
        seq, condition = mixture.build(task, row, rng)
        assert len(condition) == (0 if task == Task.UNCONDITIONAL else len(seq.layout.segments) and len(condition))
        parsed = parse_sequence(seq.ids, seq.layout)
        np.testing.assert_array_equal(parsed.video, row.video[:1] if task == Task.TEXT_TO_IMAGE else row.video)
        assert seq.loss_mask[: seq.prefix_length].sum() == 0 and seq.loss_mask.sum() > 0


def test_schedule_follows_the_paper():
    mixture = Mixture(MixtureConfig(), VOCAB, WORDS, steps=100)
    early, late = mixture.task_probabilities(0), mixture.task_probabilities(50)
    assert early[Task.TEXT_TO_IMAGE] == pytest.approx(0.9) and late[Task.TEXT_TO_IMAGE] == pytest.approx(0.1)
    assert sum(early.values()) == pytest.approx(1) and sum(late.values()) == pytest.approx(1)
    drawn = [mixture.task_for_step(s, seed=0) for s in range(25)]
    assert drawn == [mixture.task_for_step(s, seed=0) for s in range(25)]
    assert drawn.count(Task.TEXT_TO_IMAGE) >= 15


def test_batches_share_a_task_and_count_skips():
    cfg = MixtureConfig(weights={"video_to_audio": 1.0, "text_to_video": 1.0})
    mixture = Mixture(cfg, VOCAB, WORDS, steps=10)
    rows, skipped = make_rows(), {}
    for step in range(6):
        task, seqs, conditions = mixture.batch(rows, step, seed=1, rank=0, size=4, skipped=skipped)
        assert all(s.layout.task == task for s in seqs) and len(conditions) == 4
        batch = collate(seqs)
        assert batch["ids"].shape[0] == 4 and 0 <= batch["padding"] < 0.2
    assert set(skipped) <= {"video_to_audio.no_audio", "text_to_video.no_caption"} and skipped


def test_condition_dropout():
    row = make_rows()[1]
    mixture = Mixture(MixtureConfig(condition_dropout=1.0), VOCAB, WORDS, steps=10)
    rng = np.random.default_rng(0)
    assert mixture.build(Task.TEXT_TO_VIDEO, row, rng)[0].layout.task == Task.UNCONDITIONAL
    assert mixture.build(Task.TEXT_TO_IMAGE, row, rng)[0].layout.text_tokens > 0
    assert mixture.build(Task.IMAGE_TO_VIDEO, row, rng)[0].layout.text_tokens == 0
    kept = Mixture(MixtureConfig(condition_dropout=0.0), VOCAB, WORDS, steps=10)
    assert kept.build(Task.IMAGE_TO_VIDEO, row, rng)[0].layout.text_tokens > 0


def test_unusable_task_and_bad_weights():
    rows = [Row(video=np.zeros((3, 2, 2), np.int64), audio=None, structure=None, caption="x")]
    mixture = Mixture(MixtureConfig(weights={"video_to_audio": 1.0}), VOCAB, WORDS, steps=10)
    with pytest.raises(ValueError, match="no row has the inputs of video_to_audio"):
        mixture.batch(rows, 0, 0, 0, 2, {})
    with pytest.raises(ValueError, match="unknown task 'text_to_smell'"):
        MixtureConfig(weights={"text_to_smell": 1.0})


def test_rows_from_shard_columns():
    columns = {"clip_id": ["a#00000"], "video_tokens": [[1, 2, 3, 4]], "video_shape": [[1, 2, 2]],
               "audio_tokens": [None], "audio_shape": [None], "caption": [""]}
    (row,) = rows_from_table(columns)
    assert row.video.shape == (1, 2, 2) and row.audio is None and row.caption is None
