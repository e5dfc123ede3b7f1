"""The tokenize job's planner without Ray: the streamed manifest, the external sort against an in-memory one, duplicate
ids across sorted runs, generations (appends in any order, removals refused, a killed planning run's leftovers), and
the sorted-stream helpers."""

import hashlib
import json
import random

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest

from pipeline import manifest as manifest_mod
from pipeline.manifest import MANIFEST_SCHEMA, iter_manifest, read_manifest
from tokenize_jobs.plan import (IDS_SCHEMA, Generation, PlanError, Planner, merge_sorted, pair_sorted, read_ipc,
                                shard_inputs)

LOCAL = pa_fs.LocalFileSystem()
NONE = np.empty(0, np.int64)


def ids(n, seed=0, prefix="v"):
    rng = random.Random(seed)
    return [f"{prefix}{rng.randrange(10 ** 9):09d}-{i}" for i in range(n)]


def write_manifest(path, keys):
    pq.write_table(pa.table({"path": [f"s3://bucket/{k}.mp4" for k in keys], "id": keys,
                             "caption": [f"caption of {k}" for k in keys], "n": list(range(len(keys)))}), path)
    return path


def planner(tmp_path, n=7, budget=50_000):
    work = tmp_path / f"work-{random.random()}"
    work.mkdir()
    return Planner(LOCAL, str(tmp_path / "out" / "__jobs" / "fp"), n, budget, str(work))


def work_rows(plan):
    return pa.concat_tables([t for path, _ in plan.work for t in read_ipc(path)])


# ---------------------------------------------------------------------------------------------------- the manifest

def test_iter_manifest_formats_agree_and_batches_do_not_change_rows(tmp_path, monkeypatch):
    rows = [{"path": "videos/a.mp4", "caption": "a red circle", "split": "train", "shape": "circle"},
            {"path": "videos/b.mp4", "caption": "", "split": "val"},
            {"path": "s3://KEY:SECRET@bucket/d.mp4", "id": "d", "caption": "remote", "shape": "square"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa_json.read_json(tmp_path / "m.jsonl")  # every key of every row a column, null where a row lacks it
    pq.write_table(table, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("path,id,caption,split,shape\n" + "".join(
        f'{r["path"]},{r.get("id", "")},"{r["caption"]}",{r.get("split", "")},{r.get("shape", "")}\n' for r in rows))
    datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(str(tmp_path / "ds"))
    expected = [
        {"id": "videos/a.mp4", "path": str(tmp_path / "videos/a.mp4"), "source": "videos/a.mp4",
         "caption": "a red circle", "split": "train", "extras": '{"shape": "circle"}'},
        {"id": "videos/b.mp4", "path": str(tmp_path / "videos/b.mp4"), "source": "videos/b.mp4", "caption": None,
         "split": "val", "extras": None},
        {"id": "d", "path": "s3://KEY:SECRET@bucket/d.mp4", "source": "s3://***@bucket/d.mp4", "caption": "remote",
         "split": None, "extras": '{"shape": "square"}'},
    ]
    for name in ("m.jsonl", "m.parquet", "ds"):
        tables = list(iter_manifest(tmp_path / name))
        assert all(t.schema.equals(MANIFEST_SCHEMA) for t in tables)
        got = pa.concat_tables(tables).to_pylist()
        if name == "ds":  # a saved dataset resolves paths against its own folder
            for row, want in zip(got, expected):
                assert row["path"] == want["path"].replace(str(tmp_path), str(tmp_path / "ds"))
                row["path"] = want["path"]
        assert got == expected, name
    # CSV values are text, an empty field null.
    assert pa.concat_tables(iter_manifest(tmp_path / "m.csv")).to_pylist() == expected
    # One row per block: the same rows, in the same order.
    monkeypatch.setattr(manifest_mod, "BLOCK_BYTES", 16)
    monkeypatch.setattr(manifest_mod, "BATCH_ROWS", 1)
    for name in ("m.jsonl", "m.parquet"):
        tables = list(iter_manifest(tmp_path / name))
        assert len(tables) == 3 and pa.concat_tables(tables).to_pylist() == expected, name
    # The whole-table reader agrees on the columns both have.
    whole = read_manifest(tmp_path / "m.jsonl").to_pylist()
    assert [{k: r[k] for k in ("id", "path", "source", "caption")} for r in whole] == \
        [{k: r[k] for k in ("id", "path", "source", "caption")} for r in expected]


def test_a_bad_row_is_named_by_its_row_number_in_the_whole_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_mod, "BATCH_ROWS", 2)
    pq.write_table(pa.table({"path": ["a.mp4", "b.mp4", "c.mp4", ""]}), tmp_path / "m.parquet")
    with pytest.raises(PlanError, match="m.parquet: row 3 has an empty path"):
        planner(tmp_path).plan(str(tmp_path / "m.parquet"), [], NONE, "t0")


# ---------------------------------------------------------------------------------------------------- one generation

def test_the_external_sort_gives_the_in_memory_assignment(tmp_path):
    keys = ids(5000)
    plan = planner(tmp_path).plan(str(write_manifest(tmp_path / "m.parquet", keys)), [], NONE, "t0")
    assert len(list((tmp_path / "out").rglob("run-*"))) == 0  # runs are removed once merged
    (g,) = plan.generations
    assert (g.index, g.inputs, g.first_shard, g.shards, g.created) == (0, 5000, 0, 715, "t0")
    assert g.ids_sha256 == hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    assert plan.new_inputs == plan.inputs == 5000 and plan.pending_shards == 715
    rows = work_rows(plan)
    assert rows.column("id").to_pylist() == sorted(keys)
    assert rows.column("shard").to_pylist() == [i // 7 for i in range(5000)]
    first = rows.slice(0, 1).to_pylist()[0]
    assert first["path"] == f"s3://bucket/{first['id']}.mp4" and json.loads(first["extras"]).keys() == {"n"}
    stored = pq.read_table(tmp_path / "out" / "__jobs" / "fp" / "ids" / "gen-00000" / "part-00000.parquet")
    assert stored.column("id").to_pylist() == sorted(keys)
    # Done shards need no work.
    again = planner(tmp_path).plan(str(tmp_path / "m.parquet"), plan.generations, np.arange(700), "t1")
    assert again.new_inputs == 0 and again.generations == plan.generations and again.pending_shards == 15
    assert work_rows(again).column("id").to_pylist() == sorted(keys)[700 * 7:]


def test_duplicates_are_found_across_sorted_runs(tmp_path):
    keys = ids(3000)
    keys[2999] = keys[17]  # far apart: in different runs
    with pytest.raises(PlanError, match=f"duplicate ids, for example '{keys[17]}'"):
        planner(tmp_path).plan(str(write_manifest(tmp_path / "m.parquet", keys)), [], NONE, "t0")
    with pytest.raises(PlanError, match="has no rows"):
        planner(tmp_path).plan(str(write_manifest(tmp_path / "e.parquet", [])), [], NONE, "t0")


# ---------------------------------------------------------------------------------------------------- generations

def test_an_append_in_any_order_plans_only_the_new_inputs_after_the_old_shards(tmp_path):
    old = ids(2000)
    gen0 = planner(tmp_path).plan(str(write_manifest(tmp_path / "m0.parquet", old)), [], NONE, "t0").generations
    new = ids(300, seed=1, prefix="n")
    both = old + new
    random.Random(2).shuffle(both)
    plan = planner(tmp_path).plan(str(write_manifest(tmp_path / "m1.parquet", both)), gen0,
                                  np.arange(gen0[0].shards), "t1")
    g0, g1 = plan.generations
    assert g0 == gen0[0] and (g1.index, g1.inputs, g1.first_shard, g1.shards) == (1, 300, g0.shards, 43)
    assert g1.ids_sha256 == hashlib.sha256("\n".join(sorted(new)).encode()).hexdigest()
    assert plan.inputs == 2300 and plan.new_inputs == 300
    rows = work_rows(plan)
    assert rows.column("id").to_pylist() == sorted(new)
    assert rows.column("shard").to_pylist() == [g0.shards + i // 7 for i in range(300)]
    assert shard_inputs(plan.generations, 7, g0.shards - 1) == 2000 - 285 * 7
    assert shard_inputs(plan.generations, 7, g0.shards + 42) == 300 - 42 * 7
    assert shard_inputs(plan.generations, 7, 3) == 7
    # Old shards not done yet are worked on too, each generation's rows together, in shard order.
    pending = planner(tmp_path).plan(str(tmp_path / "m1.parquet"), plan.generations, np.arange(280), "t2")
    assert pending.new_inputs == 0 and pending.pending_shards == 6 + 43
    shards = work_rows(pending).column("shard").to_pylist()
    assert shards == sorted(shards) and shards[0] == 280 and len(shards) == 2000 - 280 * 7 + 300


def test_removing_inputs_is_refused_and_leaves_no_generation(tmp_path):
    old = ids(1000)
    gens = planner(tmp_path).plan(str(write_manifest(tmp_path / "m0.parquet", old)), [], NONE, "t0").generations
    fewer = old[:400] + old[401:] + ids(50, seed=3, prefix="n")  # one removed, some added
    with pytest.raises(PlanError, match=rf"lacks 1 of the 1000 inputs .*e\.g\. '{old[400]}'.*cannot be removed"):
        planner(tmp_path).plan(str(write_manifest(tmp_path / "m1.parquet", fewer)), gens, NONE, "t1")
    assert not (tmp_path / "out" / "__jobs" / "fp" / "ids" / "gen-00001").exists()


def test_a_generation_never_recorded_is_planned_again(tmp_path):
    old = ids(500)
    gens = planner(tmp_path).plan(str(write_manifest(tmp_path / "m0.parquet", old)), [], NONE, "t0").generations
    stale = tmp_path / "out" / "__jobs" / "fp" / "ids" / "gen-00001"
    stale.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["zzz"], "shard": [999]}, schema=IDS_SCHEMA), stale / "part-00007.parquet")
    plan = planner(tmp_path).plan(str(write_manifest(tmp_path / "m1.parquet", old + ["new"])), gens, NONE, "t1")
    assert plan.generations[1].inputs == 1 and sorted(p.name for p in stale.iterdir()) == ["part-00000.parquet"]


def test_generation_records_round_trip():
    g = Generation(1, 300, 286, 43, 1, "ab" * 32, "s3://***@b/m.parquet", "2026-01-01T00:00:00+00:00")
    assert Generation.from_dict(json.loads(json.dumps(g.to_dict()))) == g


# ---------------------------------------------------------------------------------------------------- sorted streams

def chunks(values, size):
    return [pa.table({"id": values[i:i + size]}) for i in range(0, len(values), size)]


def test_merge_and_pair_sorted_streams():
    rng = random.Random(0)
    keys = [f"k{i:05d}" for i in range(1000)]
    rng.shuffle(keys)
    streams = [chunks(sorted(keys[i::3]), size) for i, size in zip(range(3), (1, 7, 100))]
    merged = list(merge_sorted(streams + [[]]))
    assert [v for t in merged for v in t.column("id").to_pylist()] == sorted(keys)
    assert list(merge_sorted([])) == []
    left, right = sorted(keys[:600]), sorted(keys[400:])
    schema = pa.schema([("id", pa.string())])
    pairs = list(pair_sorted(chunks(left, 13), chunks(right, 50), schema, schema))
    for a, b in pairs:  # a key in both streams is in the same pair
        assert set(a.column("id").to_pylist()) & set(right) <= set(b.column("id").to_pylist())
    assert sorted(v for a, _ in pairs for v in a.column("id").to_pylist()) == left
    assert sorted(v for _, b in pairs for v in b.column("id").to_pylist()) == right
    only_left = list(pair_sorted(chunks(left, 100), [], schema, schema))
    assert sum(len(a) for a, _ in only_left) == 600 and all(len(b) == 0 for _, b in only_left)
