"""pipeline.storage: the URI predicate and checks, redaction, atomic writes (locally and on an S3 server on
127.0.0.1, with a failure injected mid-upload) and the output-folder lock."""

import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import (Busy, UnsafeUri, Unreachable, check_folder, check_uri, exclusive, is_uri, owner_record,
                              redact, redact_values, remove_temporaries, resolve_filesystem, save_text, write_json,
                              write_table)

LOCAL = pa_fs.LocalFileSystem()


def test_one_uri_predicate():
    for uri in ("s3://bucket/key", "gs://b/k", "hdfs://namenode:8020/p", "file:///tmp/x", "abfs://c@a/p"):
        assert is_uri(uri)
    for path in ("videos/a.mp4", "/abs/a.mp4", "C:/data/a.mp4", "ab:c.mp4", "weird://", "$(touch x).mp4", ""):
        assert is_uri(path) == (path == "weird://"), path


def test_query_parameters_are_refused_and_secrets_redacted():
    with pytest.raises(UnsafeUri, match=r"\['endpoint_override', 'scheme'\] are refused") as e:
        check_uri("s3://bucket/v.mp4?endpoint_override=evil.example:9000&scheme=http")
    assert "evil.example" not in str(e.value)
    assert check_uri("s3://bucket/v.mp4?region=eu-west-1") == "s3://bucket/v.mp4?region=eu-west-1"
    assert check_uri("videos/a?b=c.mp4") == "videos/a?b=c.mp4"  # a local name may hold anything
    with pytest.raises(UnsafeUri):
        resolve_filesystem("s3://bucket/out?access_key=AK&secret_key=SK")
    assert redact("s3://AKIA:SECRET@bucket/k?region=us&secret_key=SK") == "s3://***@bucket/k?region=us&secret_key=***"
    assert redact("http://user:pw@mlflow:5000") == "http://***@mlflow:5000"
    assert redact("s3://bucket/plain key.mp4") == "s3://bucket/plain key.mp4"
    assert redact_values({"a": ["gs://k:s@b/x", 3], "b": "/local/p"}) == {"a": ["gs://***@b/x", 3], "b": "/local/p"}


def test_local_writes_are_atomic_with_unique_temporaries(tmp_path):
    target = tmp_path / "deep" / "job.json"
    write_json(LOCAL, str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def broken(out):
        out.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        storage.write_atomic(LOCAL, str(target), broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.json"]
    names = {storage._temporary(str(target)) for _ in range(100)}
    assert len(names) == 100 and all(storage._TEMPORARY.match(n.rsplit("/", 1)[1]) for n in names)
    save_text(tmp_path / "t.txt", "text")
    assert (tmp_path / "t.txt").read_text() == "text"
    (tmp_path / ".job.json.tmp-0123abcd").write_text("left by a killed writer")
    assert remove_temporaries(LOCAL, str(tmp_path)) == 1 and not list(tmp_path.glob(".*"))


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    lock = tmp_path / "_jobs" / "lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pyarrow.fs as f; from pipeline.storage import exclusive, owner_record\n"
         f"with exclusive(f.LocalFileSystem(), {str(lock)!r}, owner_record(job='tokenize'), 'OUT'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match=rf"OUT is in use by pid {holder.pid} on .* \(job tokenize\)"):
            with exclusive(LOCAL, str(lock), owner_record(), "OUT"):
                pass
    finally:
        holder.communicate("")
    with exclusive(LOCAL, str(lock), owner_record(), "OUT"):  # released when its holder ended
        pass


def test_a_failed_upload_publishes_nothing(s3):
    table = pa.table({"x": list(range(10000))})
    size = write_table(s3, "bucket/t/shard-00000.parquet", table)

    def cut(out):  # what an exception mid-upload leaves: half a file, then the error
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out.write(sink.getvalue().to_pybytes()[:20000])
        raise ConnectionResetError("connection reset mid-upload")

    with pytest.raises(ConnectionResetError):
        storage.write_atomic(s3, "bucket/t/shard-00001.parquet", cut)
    keys = [i.path for i in s3.get_file_info(pa_fs.FileSelector("bucket/t", recursive=True))]
    assert keys == ["bucket/t/shard-00000.parquet"]  # no truncated shard, no temporary left behind
    assert s3.get_file_info(keys[0]).size == size and pq.read_table(keys[0], filesystem=s3).equals(table)


def test_a_store_that_does_not_answer_is_named(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Unreachable, match=r"^--out s3://\*\*\*@bucket/runs: cannot reach it \(.*Could not connect"):
        check_folder("s3://user:secret@bucket/runs")


def test_object_store_lease(s3, monkeypatch):
    monkeypatch.setattr(storage, "LEASE_S", 2.0)
    with exclusive(s3, "bucket/out/_jobs/lock", owner_record(job="tokenize"), "OUT"):
        with pytest.raises(Busy, match=r"OUT is in use by pid \d+ .*\(job tokenize\)"):
            with exclusive(s3, "bucket/out/_jobs/lock", owner_record(), "OUT"):
                pass
        time.sleep(2.5)  # renewed every LEASE_S / 4: still held
        with pytest.raises(Busy):
            with exclusive(s3, "bucket/out/_jobs/lock", owner_record(), "OUT"):
                pass
    assert s3.get_file_info("bucket/out/_jobs/lock").type == pa_fs.FileType.NotFound
    write_json(s3, "bucket/out/_jobs/lock", {"pid": 1, "host": "gone", "expires": time.time() - 1})  # a dead job's
    with exclusive(s3, "bucket/out/_jobs/lock", owner_record(), "OUT"):
        pass
