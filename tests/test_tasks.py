"""Every task of the mixture, end to end in miniature: the mixture builds one training sequence of the task from a
clip's token row, a tiny LM overfits that one sequence, and greedy generation through the real sampling path (KV
cache, logits restricted to each position's valid range) gives the sequence back exactly from its prompt. A task whose
layout, loss mask or sampling masks were wrong could not come back whole, so a broken task fails here in seconds."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sampling import generate, generate_uncached
from pipeline.sequence import Task, parse_sequence
from pipeline.text import WordVocabulary
from train.mixture import Mixture, MixtureConfig, Row

DEBUG = load_config(LLMConfig, "debug", kind="llm")
CAPTION = "a red circle moving left"


def clip_row(seed: int = 0) -> Row:
    rng = np.random.default_rng(seed)
    vocab = DEBUG.vocab
    return Row(video=rng.integers(0, vocab.video_codes, (2, 2, 2)),
               audio=rng.integers(0, vocab.audio_codes, (vocab.audio_levels, 6)),
               structure=rng.integers(0, vocab.video_codes, (2, 2, 2)), caption=CAPTION)


def overfit(sequence, steps: int = 300) -> VideoPoetLM:
    torch.manual_seed(0)
    model = VideoPoetLM(dataclasses.replace(DEBUG, width=64, mlp_width=192))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.from_numpy(sequence.ids)[None]
    prefix = torch.tensor([sequence.prefix_length])
    mask = torch.from_numpy(sequence.loss_mask)[None]
    for _ in range(steps):
        loss, _ = model.loss(ids, prefix, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    return model.eval()


@pytest.mark.threshold  # exact recall needs the loss near 0 after 300 steps, on 1 thread as on many
@pytest.mark.parametrize("task", list(Task), ids=lambda t: t.value)
def test_task_is_learnt_and_generated_back_exactly(task):
    words = WordVocabulary.build([CAPTION], max_size=DEBUG.vocab.text_size)
    mixture = Mixture(MixtureConfig(weights={task.value: 1.0}, condition_dropout=0.0), DEBUG.vocab, words, steps=10)
    row = clip_row()
    assert mixture.lacks(task, row) is None
    sequence, condition = mixture.build(task, row, np.random.default_rng(1))
    assert sequence.layout.task == task
    model = overfit(sequence)

    prompt = sequence.ids[: sequence.prefix_length]
    with torch.no_grad():
        generated = generate(model, sequence.layout, prompt, temperature=0.0)[0]
    np.testing.assert_array_equal(generated, sequence.ids)
    parsed = parse_sequence(generated, sequence.layout)  # every id where the layout allows it
    if sequence.layout.output_video_shape:
        assert parsed.video.shape[1:] == row.video.shape[1:]
    if task in (Task.TEXT_TO_VIDEO, Task.STYLIZATION):  # the KV cache changes nothing
        with torch.no_grad():
            np.testing.assert_array_equal(generate_uncached(model, sequence.layout, prompt, temperature=0.0)[0],
                                          generated)
