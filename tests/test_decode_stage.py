"""The decode stage on the real corpus, first as a plain callable, then inside a real Ray Data pipeline."""

from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest import read_manifest
from pipeline.media import MediaConfig
from pipeline.decode import CLIP_COLUMNS, ROWS_PER_BATCH, DecodeClips

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real" / "captions.jsonl"
CFG = MediaConfig(height=32, width=32, max_clips=2)


@pytest.fixture(scope="module")
def manifest():
    if not REAL.exists():
        pytest.skip(f"{REAL} not present")
    return read_manifest(REAL)


def test_every_real_file_gives_rows(manifest):
    stage = DecodeClips(CFG)
    batch = {k: np.array(v, dtype=object) for k, v in manifest.to_pydict().items()}
    batches = list(stage(batch))
    assert all(set(b) == set(CLIP_COLUMNS) for b in batches)
    out = {k: np.concatenate([b[k] for b in batches]) for k in CLIP_COLUMNS}
    assert out["frames"].shape[1:] == (17, 32, 32, 3) and out["frames"].dtype == np.uint8
    assert out["audio"].shape[1:] == (CFG.clip_samples,)
    failed = {s: k for s, k, ok in zip(out["source"], out["error_kind"], out["ok"]) if not ok}
    # video_with_failing_audio.mp4 breaks only after the first two clips, which max_clips stops at.
    assert failed == {"result.webm": "empty", "example.wav": "no_video", "crunching.mp3": "no_video",
                      "corrupted.mp4": "corrupt"}
    ok_sources = {s for s, ok in zip(out["source"], out["ok"]) if ok}
    assert {"flipping_a_pancake.mkv", "video_90.mov", "example.mp4", "chaplin.mp4"} <= ok_sources
    assert not out["has_audio"][list(out["source"]).index("example.mp4")]
    ids = [c for c, ok in zip(out["clip_id"], out["ok"]) if ok]
    assert len(ids) == len(set(ids))


def test_inside_ray_data(manifest, ray_local):
    import ray

    ds = ray.data.from_arrow(manifest).map_batches(
        DecodeClips, fn_constructor_args=(CFG,), batch_size=2, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
    rows = ds.select_columns(["source", "clip_id", "ok"]).take_all()
    assert len({r["source"] for r in rows}) == len(manifest)
    assert sum(not r["ok"] for r in rows) == 4


def test_an_input_streams_in_batches_and_its_last_one_counts_its_rows(tmp_path):
    from pipeline.media import write_video

    frames = np.random.default_rng(0).integers(0, 255, (8 * 17 * (ROWS_PER_BATCH + 2), 16, 16, 3), np.uint8)
    write_video(str(tmp_path / "long.mp4"), frames[::8], 1.0)  # one frame a second: 8 fps output repeats each
    cfg = MediaConfig(height=16, width=16, max_clips=ROWS_PER_BATCH + 1)
    item = {"id": np.array(["long"], dtype=object), "path": np.array([str(tmp_path / "long.mp4")], dtype=object),
            "source": np.array(["long.mp4"], dtype=object), "caption": np.array([None], dtype=object)}
    batches = list(DecodeClips(cfg)(item))
    assert [len(b["ok"]) for b in batches] == [ROWS_PER_BATCH, 1]
    assert [b["input_rows"].tolist() for b in batches] == [[0] * ROWS_PER_BATCH, [ROWS_PER_BATCH + 1]]
    assert [b["truncated"].tolist() for b in batches] == [[False] * ROWS_PER_BATCH, [True]]
    assert np.concatenate([b["clip_index"] for b in batches]).tolist() == list(range(ROWS_PER_BATCH + 1))
