"""Token shard schema, atomic writes and the fingerprint-checking reader, without Ray."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import pytest

from pipeline.shards import (SCHEMA, SCHEMA_VERSION, ShardError, ShardMeta, clips_table,
                             fingerprint_of, open_shards, shard_index, shard_name)
from pipeline.storage import read_json, remove_temporaries, write_atomic, write_json, write_table

LOCAL = pa_fs.LocalFileSystem()
TOKENIZERS = {"video": {"fingerprint": "a" * 16, "kind": "magvit", "config": {}}, "audio": None}
SETTINGS = {"media": {"height": 32}, "hr": False, "structure": False}


def batch(rows=3, seed=0):
    """Clip rows shaped as the tokenize job's stages emit them: every row decoded, the second one silent."""
    rng = np.random.default_rng(seed)
    return {
        "clip_id": np.array([f"v{i}#00000" for i in range(rows)], object),
        "id": np.array([f"v{i}" for i in range(rows)], object),
        "source": np.array([f"videos/v{i}.mp4" for i in range(rows)], object),
        "clip_index": np.zeros(rows, np.int64),
        "start": np.zeros(rows), "end": np.full(rows, 2.125),
        "caption": np.array(["a cat", None, "a dog"][:rows], object),
        "split": np.array(["train"] * rows, object), "extras": np.array([None] * rows, object),
        "video_tokens": rng.integers(0, 256, (rows, 5 * 4 * 4)).astype(np.int32),
        "video_shape": np.tile(np.array([5, 4, 4], np.int32), (rows, 1)),
        "audio_tokens": rng.integers(0, 64, (rows, 4 * 106)).astype(np.int16),
        "audio_shape": np.tile(np.array([4, 106], np.int32), (rows, 1)),
        "has_audio": np.array([True, False, True][:rows]),
        "padded_frames": np.zeros(rows, np.int64),
        "source_fps": np.array([25.0, np.nan, 8.0][:rows]),
        "source_width": np.array([640.0, np.nan, 48.0][:rows]), "source_height": np.array([360.0, np.nan, 32.0][:rows]),
        "source_duration": np.array([9.6, np.nan, 2.1][:rows]),
    }


def meta(fingerprint="f" * 16, index=0, clips=3):
    return ShardMeta(fingerprint, TOKENIZERS, SETTINGS, {"index": index, "clips": clips}, "2026-01-01T00:00:00+00:00")


def write_shard(directory, index=0, fingerprint="f" * 16, rows=3):
    path = directory / shard_name(index)
    write_table(LOCAL, str(path), clips_table(batch(rows)), meta(fingerprint, index, rows).to_metadata())
    return path


def test_clips_table_schema_and_values():
    b = batch()
    table = clips_table(b)
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        # Flattened row-major over the recorded shape: reshaping gives back the array the stage produced.
        np.testing.assert_array_equal(np.reshape(row["video_tokens"], row["video_shape"]),
                                      b["video_tokens"][i].reshape(5, 4, 4))
    assert rows[0]["audio_tokens"] == b["audio_tokens"][0].tolist() and rows[0]["audio_shape"] == [4, 106]
    assert rows[1]["audio_tokens"] is None and rows[1]["audio_shape"] is None
    assert rows[1]["caption"] is None and rows[1]["source_fps"] is None and rows[1]["source_width"] is None
    assert rows[0]["source_width"] == 640 and rows[0]["source_duration"] == 9.6
    assert all(row["hr_video_tokens"] is None and row["structure_tokens"] is None for row in rows)
    assert all(row["text_embeddings"] is None and row["text_shape"] is None for row in rows)


def test_clips_table_text_embeddings_are_ragged():
    b = batch()
    rng = np.random.default_rng(1)
    b["text_embeddings"] = rng.normal(size=(3, 4 * 16)).astype(np.float16)  # up to 4 positions of width 16
    b["text_shape"] = np.array([[3, 16], [0, 16], [4, 16]], np.int32)
    rows = clips_table(b).to_pylist()
    assert [r["text_shape"] for r in rows] == [[3, 16], None, [4, 16]]
    assert rows[1]["text_embeddings"] is None
    for i in (0, 2):
        n = b["text_shape"][i].prod()
        np.testing.assert_array_equal(np.array(rows[i]["text_embeddings"], np.float16), b["text_embeddings"][i][:n])


def test_clips_table_requires_video_tokens():
    b = batch()
    del b["video_tokens"]
    with pytest.raises(KeyError, match="video_tokens"):
        clips_table(b)


def test_shard_names():
    assert shard_name(7) == "shard-00007.parquet"
    assert shard_index("s3://b/x/shard-00007.parquet") == 7 and shard_index("shard-123456.parquet") == 123456
    assert shard_index(".shard-00007.parquet.tmp-1234") is None and shard_index("errors.parquet") is None


def test_fingerprint_follows_tokenizers_and_settings():
    base = fingerprint_of(TOKENIZERS, SETTINGS)
    assert base == fingerprint_of(json.loads(json.dumps(TOKENIZERS)), dict(SETTINGS))
    other = {**TOKENIZERS, "video": {**TOKENIZERS["video"], "fingerprint": "b" * 16}}
    assert fingerprint_of(other, SETTINGS) != base
    assert fingerprint_of(TOKENIZERS, {**SETTINGS, "hr": True}) != base
    # Only the tokenizers' own fingerprints count, not where their checkpoints were read from.
    moved = {**TOKENIZERS, "video": {**TOKENIZERS["video"], "location": "/elsewhere"}}
    assert fingerprint_of(moved, SETTINGS) == base


def test_write_round_trip_with_metadata(tmp_path):
    path = write_shard(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    schema = pq.read_schema(path)
    assert ShardMeta.from_metadata(schema.metadata, str(path)) == meta()
    assert pq.read_table(path).num_rows == 3


def test_failed_write_leaves_nothing(tmp_path):
    def write(out):
        out.write(b"PAR1 half a file")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(LOCAL, str(tmp_path / shard_name(0)), write)
    assert list(tmp_path.iterdir()) == []


def test_remove_temporaries(tmp_path):
    (tmp_path / ".shard-00000.parquet.tmp-abcd1234").write_bytes(b"partial")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".shard-00001.json.tmp-00000000").write_bytes(b"partial")
    keep = write_shard(tmp_path)
    assert remove_temporaries(LOCAL, str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [keep.name]


def test_json_helpers(tmp_path):
    assert read_json(LOCAL, str(tmp_path / "none.json")) is None
    write_json(LOCAL, str(tmp_path / "a" / "job.json"), {"inputs": 3})
    assert read_json(LOCAL, str(tmp_path / "a" / "job.json")) == {"inputs": 3}


def test_open_shards_from_file_folder_and_out(tmp_path):
    fp = "f" * 16
    first, second = write_shard(tmp_path / fp, 0, fp), write_shard(tmp_path / fp, 1, fp, rows=2)
    (tmp_path / "_jobs" / fp).mkdir(parents=True)
    for location in (str(tmp_path), str(tmp_path / fp), [str(first), str(second)]):
        shards = open_shards(location)
        assert shards.fingerprint == fp and shards.clips == 5
        assert shards.to_table(["clip_id"]).num_rows == 5
    assert open_shards(str(first)).files == (str(first),)


def test_open_shards_refuses_to_mix_fingerprints(tmp_path):
    a, b = "a" * 16, "b" * 16
    file_a, file_b = write_shard(tmp_path / a, 0, a), write_shard(tmp_path / b, 0, b)
    with pytest.raises(ShardError, match=f"2 tokenizations .*{a}.*{b}"):
        open_shards(str(tmp_path))
    with pytest.raises(ShardError, match=f"refusing to mix tokenizer fingerprints .*{a}.*{b}"):
        open_shards([str(file_a), str(file_b)])
    # A file copied into the wrong folder is caught by its own metadata, not its folder's name.
    write_shard(tmp_path / a, 1, b)
    with pytest.raises(ShardError, match="refusing to mix"):
        open_shards(str(tmp_path / a))


def test_open_shards_rejects_foreign_files(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / shard_name(0))
    with pytest.raises(ShardError, match="not a videopoet token shard"):
        open_shards(str(tmp_path))
    newer = json.loads(meta().to_metadata()[b"videopoet"]) | {"schema_version": SCHEMA_VERSION + 1}
    pq.write_table(clips_table(batch()).replace_schema_metadata({b"videopoet": json.dumps(newer).encode()}),
                   tmp_path / shard_name(0))
    with pytest.raises(ShardError, match=f"schema version {SCHEMA_VERSION + 1}"):
        open_shards(str(tmp_path))
    with pytest.raises(ShardError, match="does not exist"):
        open_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no shard files"):
        open_shards(str(tmp_path / "empty"))
