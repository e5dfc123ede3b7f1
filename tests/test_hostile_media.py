"""Hostile and broken media never stop a corpus job, and nothing unsafe is reachable from data.

A crafted corpus (tests/hostile_corpus.py, made with the project's own ffmpeg) goes through `probe`, through
`decode` in a fresh process that measures its peak memory, and through a real tokenize job on Ray Data; faults are
injected into probing and decoding; a job's shard upload fails part-way on an S3 server on 127.0.0.1 and the shard
is redone on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import pytest
import torch

import hostile_corpus
from hostile_corpus import EXPECTED
from pipeline import media, probe as probe_mod
from pipeline.checkpoint import save_checkpoint
from pipeline.config import load_config, to_dict
from pipeline.ffmpeg import MediaError
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.probe import probe
from pipeline.quantizers import RVQConfig
from pipeline.shards import JOBS_DIR, open_shards
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.storage import exclusive, owner_record
from pipeline.synth import SynthConfig, write_corpus
from pipeline.decode import DecodeClips
from tokenize_jobs.cli import tokenize
from tokenize_jobs.job import TokenizeConfig

DEBUG = load_config(TokenizeConfig, "debug", kind="tokenize").media
MB = 1 << 20


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    return hostile_corpus.build(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizers")
    torch.manual_seed(0)
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    save_checkpoint(root / "video", MagvitModel(video), video)
    audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=2, codebook_size=16))
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    return root


def test_probe_gives_facts_or_a_typed_error(crafted):
    for name, (_, kind, _) in EXPECTED.items():
        try:
            info = probe(str(crafted / name))
        except MediaError as e:
            assert e.kind in ("refused_format", "not_media"), (name, e)
            assert kind == e.kind and str(crafted / name) in str(e)
            continue
        assert kind not in ("refused_format", "not_media"), name
        assert info.rotation == 0
    assert probe(str(crafted / "huge_4000x4000.mkv")).coded_width == 4000  # the container says so; nothing decoded


# Decodes in a fresh process, one input after another: per input, the peak resident memory of its largest child
# (ffmpeg) and of the process so far. Peaks are VmHWM, the high-water mark of a process's own memory since its exec
# (getrusage's ru_maxrss would count the memory of the process it was forked from), read every 5 ms.
MEASURE = """
import json, os, sys, threading, time
from pipeline.config import from_dict
from pipeline.media import MediaConfig, decode

def hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0

def ffmpeg_children():  # a child not yet through exec is still this process's image: not counted
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        pids = f.read().split()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ffmpeg" in os.path.basename(f.read().split(b"\\0")[0]):
                    yield pid
        except OSError:
            pass

peak = [0]
def poll():
    while True:
        peak[0] = max([peak[0], *(hwm(pid) for pid in ffmpeg_children())])
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
cfg = from_dict(MediaConfig, json.loads(sys.argv[1]))
for path in sys.argv[2:]:
    peak[0] = 0
    result = decode(path, cfg)
    time.sleep(0.01)
    print(json.dumps({"clips": len(result.clips), "kind": result.error.kind if result.error else None,
                      "truncated": result.truncated, "python": hwm("self"), "ffmpeg": peak[0]}), flush=True)
"""


def test_each_input_decodes_to_its_clips_or_error_in_bounded_memory(crafted, capsys):
    cfg = dataclasses.replace(DEBUG, height=128, width=128)  # the paper's frame size, the debug flavor's limits
    paths = [str(crafted / name) for name in EXPECTED]
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(to_dict(cfg)), *paths], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    results = dict(zip(EXPECTED, map(json.loads, done.stdout.splitlines())))
    rows = [f"{'input':34s} {'clips':>5s}  {'error kind':15s} {'trunc':5s} {'ffmpeg MB':>9s} {'python MB':>9s}"]
    for name, r in results.items():
        rows.append(f"{name:34s} {r['clips']:5d}  {r['kind'] or '-':15s} {str(r['truncated']):5s} "
                    f"{r['ffmpeg'] / MB:9.0f} {r['python'] / MB:9.0f}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    for name, r in results.items():
        assert (r["clips"], r["kind"], r["truncated"]) == EXPECTED[name], name
        assert r["ffmpeg"] < 200 * MB and r["python"] < 400 * MB, (name, r)
    assert not list(crafted.parent.rglob("pwned"))


def test_opting_in_to_a_playlist_format_decodes_it(crafted):
    trusting = dataclasses.replace(DEBUG, allow_formats=("hls",))
    assert media.decode(str(crafted / "playlist.m3u8"), trusting).clips  # the segment it names
    assert probe(str(crafted / "playlist.m3u8"), allow_formats=["hls"]).format == "hls"
    assert probe_mod.main(["--allow-format", "hls", str(crafted / "playlist.m3u8")]) == 0
    assert probe_mod.main([str(crafted / "playlist.m3u8")]) == 1


def test_the_deadline_bounds_an_input_in_all(crafted):
    cfg = dataclasses.replace(DEBUG, max_clips=0, deadline_s=0.05, timeout_s=30.0)
    began = time.monotonic()
    result = media.decode(str(crafted / "gap_600s.mkv"), cfg)
    assert result.error.kind == "deadline" and "media.deadline_s = 0.05 s" in str(result.error)
    assert time.monotonic() - began < 5


def test_the_audio_buffer_keeps_its_limit_and_says_when_a_clip_lost_its_audio():
    buffer = media._AudioBuffer(limit=16000)
    read, write = os.pipe()
    filler = threading.Thread(target=buffer.fill, args=(read,))
    filler.start()
    with open(write, "wb") as pipe:
        pipe.write(np.arange(48000, dtype=np.float32).tobytes())
    filler.join()
    assert buffer.ready(16000)
    np.testing.assert_array_equal(buffer.take(15000, 1000), np.arange(15000, 16000, dtype=np.float32))
    with pytest.raises(media._Overrun):
        buffer.ready(16001)


@pytest.mark.parametrize("field, value, message", [
    ("deadline_s", 0.0, "deadline_s must be > 0"), ("max_pixels", 0, "max_pixels must be >= 1"),
    ("max_download_bytes", -1, "max_download_bytes must be >= 1"),
    ("audio_buffer_s", 1.0, "audio_buffer_s must hold one clip's audio"),
    ("allow_formats", ("hls", "a b"), "allow_formats: 'a b' is not an ffmpeg demuxer name"),
])
def test_limits_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DEBUG, **{field: value})


def test_every_shipped_flavor_bounds_the_work_per_input():
    for flavor in ("debug", "demo", "paper"):
        cfg = load_config(TokenizeConfig, flavor, kind="tokenize").media
        assert cfg.max_clips > 0 and cfg.deadline_s <= 600 and cfg.max_pixels <= 7680 * 4320, flavor
        assert cfg.max_download_bytes <= 8 << 30 and cfg.audio_buffer_s <= 60 and cfg.allow_formats == (), flavor


class Injected(Exception):
    """A fault nobody planned for."""


FAULTS = [  # (module or class, attribute, what it raises): probing, decoding, the local copy, building the rows
    (media, "parse_ffmpeg_dump", ValueError("could not convert string to float: 'abc'")),
    (probe_mod, "_parse_stream_line", ZeroDivisionError("float division by zero")),
    (media._Windows, "push", MemoryError()),
    (media, "local_file", OSError(5, "Input/output error")),
    (media, "_plan_for", KeyError("vp9")),
    (DecodeClips, "_clip_row", Injected("a row that cannot be built")),
]


@pytest.mark.parametrize("owner, attribute, error", FAULTS, ids=[f[1] for f in FAULTS])
def test_a_fault_anywhere_in_decoding_fails_only_its_input(crafted, monkeypatch, owner, attribute, error):
    names = ["picture.png", "spaces in name.mp4", "matroska_named.mp4"]
    victim = str(crafted / names[1])
    current: list[str] = []  # the input being decoded: the stage decodes one at a time
    start = media.Decoding.__init__

    def tracked(self, path, cfg=media.MediaConfig()):
        current.append(str(path))
        start(self, path, cfg)

    original = getattr(owner, attribute)

    def faulty(*args, **kwargs):
        if current[-1] == victim:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(media.Decoding, "__init__", tracked)
    monkeypatch.setattr(owner, attribute, faulty)
    batch = {"id": np.array(names, dtype=object), "path": np.array([str(crafted / n) for n in names], dtype=object),
             "source": np.array(names, dtype=object), "caption": np.array([None] * 3, dtype=object)}
    out = list(DecodeClips(DEBUG)(batch))  # no exception leaves the stage
    rows = {k: np.concatenate([b[k] for b in out]) for k in out[0]}
    results = {n: [(ok, kind) for s, ok, kind in zip(rows["source"], rows["ok"], rows["error_kind"]) if s == n]
               for n in names}
    assert results == {"picture.png": [(True, None)], "spaces in name.mp4": [(False, "internal")],
                       "matroska_named.mp4": [(True, None)]}
    message = rows["error_message"][list(rows["source"]).index(names[1])]
    assert message.startswith(victim) and type(error).__name__ in message


def job_args(manifest: Path, out: str, tokenizers: Path, *extra: str) -> list[str]:
    return ["--manifest", str(manifest), "--out", out, "--video-tokenizer", str(tokenizers / "video"),
            "--audio-tokenizer", str(tokenizers / "audio"), "--config", "debug", *extra]


@pytest.mark.heavy
def test_a_tokenize_job_over_the_crafted_corpus_finishes_with_every_input_accounted_for(crafted, tokenizers,
                                                                                         ray_local, tmp_path,
                                                                                         capsys):
    manifest = crafted / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"path": name}) + "\n" for name in EXPECTED))
    out = tmp_path / "out"
    assert tokenize(job_args(manifest, str(out), tokenizers, "--max-error-fraction", "1")) == 0
    printed = capsys.readouterr().out
    assert f"tokenize done: {sum(c for c, _, _ in EXPECTED.values())} clips from {len(EXPECTED)} inputs" in printed
    (job,) = (out / JOBS_DIR).glob("*/job.json")
    record = json.loads(job.read_text())
    errors = pq.read_table(job.parent / "errors.parquet").to_pylist()
    clips = open_shards(str(out)).to_table(["id", "source"]).to_pylist()
    for name, (count, kind, _) in EXPECTED.items():
        assert sum(c["id"] == name for c in clips) == count, name
        assert [e["error_kind"] for e in errors if e["id"] == name] == ([kind] if kind else []), name
    assert record["inputs_truncated"] == sum(t for _, _, t in EXPECTED.values()) == 1
    # No playlist or script was followed: the files they name never became clips.
    assert not [c for c in clips if "secret" in c["source"] or c["id"].endswith((".m3u8", ".ffconcat"))]
    assert not list(crafted.parent.rglob("pwned"))


def test_a_second_job_on_the_same_out_is_refused_naming_the_first(tokenizers, tmp_path, capsys):
    write_corpus(tmp_path / "corpus", SynthConfig(width=48, height=32, fps=8, frames=17), 1, seed=0)
    out = tmp_path / "out"
    owner = owner_record(job="tokenize", fingerprint="0123456789abcdef")
    with exclusive(pa_fs.LocalFileSystem(), str(out / JOBS_DIR / "lock"), owner, "held"):
        assert tokenize(job_args(tmp_path / "corpus" / "manifest.jsonl", str(out), tokenizers)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is in use by pid {owner['pid']} on {owner['host']}" in err
    assert "(job tokenize, fingerprint 0123456789abcdef)" in err


@pytest.mark.heavy
def test_a_shard_upload_that_fails_midway_is_redone_on_the_next_run(tokenizers, ray_local, tmp_path, monkeypatch):
    """OUT on an S3 server on 127.0.0.1: the upload of shard 1 breaks half-way (the job fails), and shard 0 is
    replaced by what arrow#40502 publishes, a truncated object; the next run redoes both, and the credentials in
    OUT's URI appear in nothing it wrote."""
    from moto.server import ThreadedMotoServer

    write_corpus(tmp_path / "corpus", SynthConfig(width=48, height=32, fps=8, frames=17), 3, seed=0)
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"127.0.0.1:{server._server.server_port}"
        for key, value in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                           "AWS_ENDPOINT_URL_S3": f"http://{endpoint}"}.items():
            monkeypatch.setenv(key, value)
        s3 = pa_fs.S3FileSystem(endpoint_override=endpoint, scheme="http", access_key="KEYID", secret_key="SECRET",
                                allow_bucket_creation=True)
        s3.create_dir("bucket")
        args = job_args(manifest, "s3://KEYID:SECRET@bucket/tokens", tokenizers, "--inputs-per-shard", "1")
        real_write = pq.write_table
        calls = []

        def breaks_on_shard_1(table, where, **kwargs):
            shard = "clip_id" in table.column_names  # shards, not their records
            calls.extend([table.num_rows] if shard else [])
            if shard and len(calls) == 2:  # shard 0, then shard 1: half of it goes up, then the connection drops
                sink = pa.BufferOutputStream()
                real_write(table, sink, **kwargs)
                data = sink.getvalue().to_pybytes()
                where.write(data[: len(data) // 2])
                raise ConnectionResetError("connection reset by peer")
            return real_write(table, where, **kwargs)

        monkeypatch.setattr(pq, "write_table", breaks_on_shard_1)
        with pytest.raises(ConnectionResetError):
            tokenize(args)
        monkeypatch.setattr(pq, "write_table", real_write)
        keys = sorted(i.path for i in s3.get_file_info(pa_fs.FileSelector("bucket/tokens", recursive=True))
                      if i.type == pa_fs.FileType.File)
        (folder,) = {k.rsplit("/", 1)[0] for k in keys if k.endswith(".parquet") and f"/{JOBS_DIR}/" not in k}
        assert f"{folder}/shard-00000.parquet" in keys and f"{folder}/shard-00001.parquet" not in keys
        assert not [k for k in keys if ".tmp-" in k or k.endswith("/lock")]  # nothing half-written, lock released
        with s3.open_input_file(f"{folder}/shard-00000.parquet") as f:
            whole = f.read()
        with s3.open_output_stream(f"{folder}/shard-00000.parquet") as f:
            f.write(whole[: len(whole) // 2])

        assert tokenize(args) == 0
        shards = open_shards(f"s3://KEYID:SECRET@{folder}")
        assert [p.rsplit("/", 1)[1] for p in shards.files] == [f"shard-0000{i}.parquet" for i in range(3)]
        assert sorted(shards.to_table(["id"]).column("id").to_pylist()) == sorted(
            json.loads(line)["id"] for line in manifest.read_text().splitlines())
        with s3.open_input_file(f"{folder}/shard-00000.parquet") as f:
            assert pq.read_table(f).equals(pq.read_table(pa.BufferReader(whole)))  # redone, the same clips
        written = [i.path for i in s3.get_file_info(pa_fs.FileSelector("bucket/tokens", recursive=True))
                   if i.type == pa_fs.FileType.File]
        for key in written:
            with s3.open_input_file(key) as f:
                assert b"SECRET" not in f.read(), key
    finally:
        server.stop()


def test_an_export_never_chooses_a_text_encoder_to_run(tmp_path):
    """A super-resolution export whose config.json names a text encoder (a `torch.export` program) is refused unless
    the caller names the encoder folder: a downloaded export must not pick code to load."""
    from pipeline.generation import SuperResStage

    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "encoder.pt2").write_bytes(b"whatever an attacker put here")
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({
        "format": 1, "kind": "superres", "config": {}, "fingerprint": "0" * 16,
        "extra": {"tokenizers": {"video": {"location": str(tmp_path / "video")}},
                  "text": {"kind": "encoder", "path": str(planted)}}}))
    with pytest.raises(ValueError, match="an export never chooses one: pass the encoder folder you trust"):
        SuperResStage.load(export)
