"""Training batches of the tokenizer apps: audio crops are hop-aligned windows of the chosen clips, reproducible."""

import numpy as np
from dataclasses import replace

from pipeline.config import load_config
from train.tokenizers import AudioModality, AudioTokenizerTrainConfig


def test_audio_crops_are_hop_aligned_windows_of_the_chosen_clips():
    app = replace(load_config(AudioTokenizerTrainConfig, "debug", kind=AudioModality.kinds), crop_frames=3)
    hop = int(np.prod(app.model.strides))
    data = np.random.default_rng(0).uniform(-1, 1, (5, 20 * hop)).astype(np.float32)
    index = np.array([4, 0, 4, 2])
    x = AudioModality.batch(data, index, app, np.random.default_rng([0, 7, 0]))
    assert tuple(x.shape) == (4, 3 * hop)
    for row, clip in zip(x.numpy(), index):
        start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data[clip], 3 * hop) == row, axis=1))
        assert len(start) == 1 and start[0] % hop == 0
    again = AudioModality.batch(data, index, app, np.random.default_rng([0, 7, 0]))
    assert (x == again).all()


def test_no_crop_or_a_crop_longer_than_the_clip_gives_whole_clips():
    app = load_config(AudioTokenizerTrainConfig, "debug", kind=AudioModality.kinds)
    data = np.random.default_rng(1).uniform(-1, 1, (3, 4000)).astype(np.float32)
    index = np.array([2, 1])
    for crop in (0, 1000):
        x = AudioModality.batch(data, index, replace(app, crop_frames=crop), np.random.default_rng(0))
        assert (x.numpy() == data[index]).all()
