import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.manifest import ManifestError, read_manifest

ROWS = [
    {"path": "videos/a.mp4", "caption": "a red circle", "split": "train"},
    {"path": "videos/b.mp4", "caption": "", "split": "val"},
    {"path": "/abs/c.mp4", "caption": "abs", "split": "train"},
    {"path": "s3://bucket/d.mp4", "caption": "remote", "split": "train"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def check(table, root):
    assert table.column_names[:4] == ["id", "path", "source", "caption"]
    assert table.column("path").to_pylist() == [
        str(root / "videos/a.mp4"), str(root / "videos/b.mp4"), "/abs/c.mp4", "s3://bucket/d.mp4"]
    assert table.column("source").to_pylist() == [r["path"] for r in ROWS]
    assert table.column("id").to_pylist() == [r["path"] for r in ROWS]
    assert table.column("caption").to_pylist() == ["a red circle", None, "abs", "remote"]
    assert table.column("split").to_pylist() == ["train", "val", "train", "train"]


def test_jsonl_csv_parquet_agree(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", ROWS)
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("path,caption,split\n" + "".join(
        f'{r["path"]},"{r["caption"]}",{r["split"]}\n' for r in ROWS))
    for name in ("m.jsonl", "m.parquet", "m.csv"):
        check(read_manifest(tmp_path / name), tmp_path)


def test_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    table = read_manifest(tmp_path / "ds")
    assert table.column("path").to_pylist()[0] == str(tmp_path / "ds" / "videos/a.mp4")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"uri": "x.mp4"}]),
                               "val": datasets.Dataset.from_list([{"uri": "y.mp4"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    table = read_manifest(tmp_path / "dd")
    assert table.column("split").to_pylist() == ["train", "val"]
    assert table.column("caption").to_pylist() == [None, None]


def test_given_ids_are_kept_and_must_be_unique(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"path": "a.mp4", "id": "x"}, {"path": "b.mp4", "id": "y"}])
    assert read_manifest(tmp_path / "m.jsonl").column("id").to_pylist() == ["x", "y"]
    write_jsonl(tmp_path / "p.jsonl", [{"path": "a.mp4", "id": "x"}, {"path": "b.mp4"}, {"path": "c.mp4"}])
    assert read_manifest(tmp_path / "p.jsonl").column("id").to_pylist() == ["x", "b.mp4", "c.mp4"]
    write_jsonl(tmp_path / "d.jsonl", [{"path": "a.mp4"}, {"path": "a.mp4"}])
    with pytest.raises(ManifestError, match="duplicate ids.*a.mp4"):
        read_manifest(tmp_path / "d.jsonl")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("m.jsonl", '{"file": "a.mp4"}\n', "no path column"),
        ("m.jsonl", '{"path": ""}\n', "row 0 has an empty path"),
        ("m.jsonl", "not json\n", "cannot parse"),
        ("m.txt", "a.mp4\n", "unknown format"),
    ],
)
def test_bad_manifests_name_themselves(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(tmp_path / name)
    assert name in str(info.value)


def test_missing_and_plain_folder(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match="not a saved Hugging Face dataset"):
        read_manifest(tmp_path)


def test_real_captions_manifest():
    from pathlib import Path

    real = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real" / "captions.jsonl"
    if not real.exists():
        pytest.skip(f"{real} not present")
    table = read_manifest(real)
    assert len(table) == 13
    assert all(Path(p).exists() for p in table.column("path").to_pylist())
    assert table.column("caption").null_count == 1  # no_duration.webm has no known caption
