"""videopoet's library: configs, vocabulary and sequence layout, models, media, shards, tracking.

Nothing in this package imports Ray or DeepSpeed; distribution lives in `tokenize_jobs/` and `train/`.
"""
