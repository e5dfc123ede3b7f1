"""Training batches of the tokenizer apps: audio crops are hop-aligned windows of the chosen clips, video views are
the chosen clips mirrored and/or reversed; both reproducible."""

import numpy as np
from dataclasses import replace

from pipeline.config import load_config
from pipeline.magvit import video_to_tensor
from train.tokenizers import AudioModality, AudioTokenizerTrainConfig, VideoModality, VideoTokenizerTrainConfig


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


def test_video_views_are_the_clips_mirrored_or_reversed():
    app = replace(load_config(VideoTokenizerTrainConfig, "debug", kind=VideoModality.kinds), augment=True)
    data = np.random.default_rng(2).integers(0, 256, (4, 5, 6, 7, 3), dtype=np.uint8)
    index = np.array([3, 1, 3, 0, 2, 2, 1, 0])
    x = VideoModality.batch(data, index, app, np.random.default_rng([0, 3, 0]))
    views = []
    for row, clip in zip(x, index):
        candidates = {(m, r): np.ascontiguousarray(data[clip][::-1 if r else 1, :, ::-1 if m else 1])
                      for m in (0, 1) for r in (0, 1)}
        matches = [k for k, v in candidates.items() if (video_to_tensor(v[None])[0] == row).all()]
        assert len(matches) == 1
        views.append(matches[0])
    assert len(set(views)) > 1  # the draw mixes views
    assert (x == VideoModality.batch(data, index, app, np.random.default_rng([0, 3, 0]))).all()
    plain = VideoModality.batch(data, index, replace(app, augment=False), np.random.default_rng([0, 3, 0]))
    assert (plain == video_to_tensor(data[index])).all()
