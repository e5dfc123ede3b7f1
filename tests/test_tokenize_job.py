"""The tokenize job end to end: real ffmpeg decoding, random-init debug tokenizers, real Ray Data, real Parquet.

Tokens are checked against the tokenizers applied directly to independently decoded clips; resumption against an
uninterrupted run after a SIGKILL of a real job process; and the same job runs against an S3 server on 127.0.0.1
and on a multi-node cluster that loses a node (`ray job submit` to a local head: tests/test_cluster_flow.py).
"""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.compute as pc
import pyarrow.fs as pa_fs
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import load_config
from pipeline.magvit import MagvitConfig, MagvitModel, video_to_tensor
from pipeline.manifest import read_manifest
from pipeline.media import decode
from pipeline.quantizers import RVQConfig
from pipeline.shards import JOBS_DIR, SCHEMA, ShardError, open_shards, shard_files
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.synth import SynthConfig, write_corpus
from pipeline.text import ENCODER_FILE, WORDS_FILE, FrozenTextEncoder, WordVocabulary
from tokenize_jobs.cli import shards as shards_command
from tokenize_jobs.cli import tokenize as main
from tokenize_jobs.job import TokenizeConfig, TokenizeJob, cpu_shortfall
from pipeline.structure import structure_video
from servers import free_ports

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "real"
CFG = load_config(TokenizeConfig, "debug", kind="tokenize")
ENV = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Random-init debug tokenizers: two video ones (different weights) and a tiny 4-level audio one."""
    root = tmp_path_factory.mktemp("tokenizers")
    video = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    for seed, name in ((0, "video"), (1, "video2")):
        torch.manual_seed(seed)
        save_checkpoint(root / name, MagvitModel(video), video)
    audio = SoundStreamConfig(channels=4, latent_dim=8, quantizer=RVQConfig(levels=4, codebook_size=64))
    save_checkpoint(root / "audio", SoundStreamModel(audio), audio)
    return root


class TinyTextEncoder(torch.nn.Module):
    """A random stand-in for a T5 encoder, exported like one (pipeline.text.FrozenTextEncoder's format)."""

    def __init__(self, words: int, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(words, width)
        self.mix = torch.nn.Linear(width, width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(ids)) * mask[..., None]


@pytest.fixture(scope="module")
def text_encoder(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoder")
    words = WordVocabulary.build(read_manifest(corpus).column("caption").to_pylist())
    torch.manual_seed(0)
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    dims = {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("n", max=64)}
    program = torch.export.export(TinyTextEncoder(words.size).eval(), (ids, mask), dynamic_shapes=(dims, dims))
    torch.export.save(program, root / ENCODER_FILE)
    words.save(root / WORDS_FILE)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six synthetic MP4s with audio, two clips each at 8 fps."""
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, SynthConfig(width=48, height=32, fps=8, frames=34), 6, seed=0)
    return root / "manifest.jsonl"


def job_args(manifest, out, tokenizers, *extra, audio=True):
    args = ["--manifest", str(manifest), "--out", str(out), "--video-tokenizer", str(tokenizers / "video"),
            "--config", "debug", *extra]
    return args + (["--audio-tokenizer", str(tokenizers / "audio")] if audio else [])


@pytest.fixture(scope="module")
def tokenized(ray_local, corpus, tokenizers, tmp_path_factory):
    """The reference run: the synthetic corpus, one input per shard, audio included."""
    out = tmp_path_factory.mktemp("tokenized")
    assert main(job_args(corpus, out, tokenizers, "--inputs-per-shard", "1")) == 0
    return out


def subset(manifest, n, dest):
    """The first n rows of a manifest, with absolute paths, written to dest."""
    rows = read_manifest(manifest).slice(0, n).to_pylist()
    dest.write_text("".join(json.dumps({"path": r["path"], "id": r["id"], "caption": r["caption"]}) + "\n"
                            for r in rows))
    return dest


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.parquet"))}


def only_fingerprint(out):
    (folder,) = [p for p in Path(out).iterdir() if p.name != JOBS_DIR]
    return folder


# ---------------------------------------------------------------------------------------------------- shards

def test_tokens_match_the_tokenizers_on_independently_decoded_clips(tokenized, corpus, tokenizers):
    shards = open_shards(str(tokenized))
    table = shards.to_table()
    assert table.schema.equals(SCHEMA, check_metadata=False)
    video, audio = load_checkpoint(tokenizers / "video"), load_checkpoint(tokenizers / "audio")
    manifest = read_manifest(corpus).to_pylist()
    rows = {r["clip_id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == 12
    for item in manifest:
        result = decode(item["path"], CFG.media)
        assert result.ok and len(result.clips) == 2
        frames = np.stack([c.frames for c in result.clips])
        codes = video.encode(video_to_tensor(frames)).numpy()
        audio_codes = audio.encode(torch.from_numpy(np.stack([c.audio for c in result.clips]))).numpy()
        for clip, expected, expected_audio in zip(result.clips, codes, audio_codes):
            row = rows[f"{item['id']}#{clip.index:05d}"]
            assert row["source"] == item["source"] and row["caption"] == item["caption"]
            assert (row["start"], row["end"]) == (clip.start, clip.end)
            assert row["video_shape"] == [5, 4, 4] and row["audio_shape"] == [4, 106]
            np.testing.assert_array_equal(np.reshape(row["video_tokens"], row["video_shape"]), expected)
            np.testing.assert_array_equal(np.reshape(row["audio_tokens"], row["audio_shape"]), expected_audio)
            assert row["has_audio"] and row["split"] in ("train", "val")
            assert json.loads(row["extras"]).keys() == {"shape", "color", "motion"}


def test_shard_layout_metadata_and_job_manifest(tokenized, tokenizers):
    folder = only_fingerprint(tokenized)
    assert [p.name for p in sorted(folder.iterdir())] == [f"shard-{i:05d}.parquet" for i in range(6)]
    meta = open_shards(str(folder)).meta
    assert meta.fingerprint == folder.name and meta.schema_version == 1 and meta.created
    assert meta.tokenizers["video"]["fingerprint"] == load_checkpoint(tokenizers / "video").fingerprint()
    assert meta.tokenizers["audio"]["config"]["quantizer"]["levels"] == 4
    assert meta.settings["media"]["height"] == 32 and meta.shard["inputs"] == 1
    job = json.loads((tokenized / JOBS_DIR / folder.name / "job.json").read_text())
    assert job["status"] == "done" and job["inputs"] == 6 and job["clips"] == 12 and job["inputs_failed"] == 0
    assert pq.read_table(tokenized / JOBS_DIR / folder.name / "errors.parquet").num_rows == 0


def test_rerun_skips_finished_shards(tokenized, corpus, tokenizers):
    before = digest(only_fingerprint(tokenized))
    cfg = load_config(TokenizeConfig, "debug", ["inputs_per_shard=1"], kind="tokenize")
    summary = TokenizeJob(cfg, str(corpus), str(tokenized), str(tokenizers / "video"),
                          str(tokenizers / "audio")).run()
    assert (summary["shards_written"], summary["shards_skipped"], summary["clips"]) == (0, 6, 12)
    assert digest(only_fingerprint(tokenized)) == before


def test_removing_inputs_is_refused_naming_one(tokenized, corpus, tokenizers, tmp_path, capsys):
    smaller = subset(corpus, 3, tmp_path / "three.jsonl")
    assert main(job_args(smaller, tokenized, tokenizers, "--inputs-per-shard", "1")) == 2
    gone = sorted(read_manifest(corpus).column("id").to_pylist())[3:]
    err = capsys.readouterr().err
    assert "lacks 3 of the 6 inputs that earlier runs planned" in err and repr(gone[0]) in err
    assert main(job_args(corpus, tokenized, tokenizers, "--inputs-per-shard", "2")) == 2
    assert "inputs_per_shard = 1 (now 2)" in capsys.readouterr().err


def test_shards_load_with_pyarrow_ray_and_datasets(tokenized, ray_local, tmp_path):
    """The tokenization folder and OUT itself (the job's own files under __jobs are skipped by every reader)."""
    import datasets
    import pyarrow.dataset as pa_ds

    folder = str(only_fingerprint(tokenized))
    expected = sorted(open_shards(folder).to_table(["clip_id"]).column("clip_id").to_pylist())
    assert (tokenized / JOBS_DIR / "lock").exists() and list((tokenized / JOBS_DIR).glob("*/*.parquet"))
    for location in (folder, str(tokenized)):
        assert sorted(pa_ds.dataset(location, format="parquet").to_table().column("clip_id").to_pylist()) == expected
        ray_rows = ray_local.data.read_parquet(location).select_columns(["clip_id", "video_tokens"]).take_all()
        assert sorted(r["clip_id"] for r in ray_rows) == expected and len(ray_rows[0]["video_tokens"]) == 80
        hf = datasets.load_dataset("parquet", data_dir=location, split="train",
                                   cache_dir=str(tmp_path / "hf" / Path(location).name))
        assert sorted(hf["clip_id"]) == expected and len(hf[0]["audio_tokens"]) == 4 * 106


def test_shards_info(tokenized, capsys):
    assert shards_command(["info", str(tokenized), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)["tokenizations"]
    assert report["clips"] == 12 and report["files"] == 6 and report["status"] == "done"
    assert report["tokens"]["video"]["shapes"] == {"5x4x4": 12} and report["tokens"]["video"]["tokens"] == 960
    assert report["tokens"]["audio"]["clips"] == 12 and report["tokenizers"]["video"]["codebook_size"] == 256
    assert 0 < report["tokens"]["video"]["used_fraction"] <= 1 and report["errors"]["count"] == 0
    assert shards_command(["info", str(only_fingerprint(tokenized))]) == 0
    text = capsys.readouterr().out
    assert report["fingerprint"] in text and "video tokens: 12 clips (5x4x4 x12)" in text
    assert shards_command(["info", str(tokenized / "missing")]) == 2


def test_new_tokenizer_writes_a_new_fingerprint_with_optional_outputs(ray_local, corpus, tokenizers, text_encoder,
                                                                     tmp_path, capsys):
    manifest = subset(corpus, 2, tmp_path / "two.jsonl")
    out = tmp_path / "out"
    options = ("--hr", "--structure", "--text-encoder", str(text_encoder))
    assert main(job_args(manifest, out, tokenizers, *options, audio=False)) == 0
    first = only_fingerprint(out)
    before = digest(first)
    rows = open_shards(str(first)).to_table().to_pylist()
    video = load_checkpoint(tokenizers / "video")
    encoder = FrozenTextEncoder.load(text_encoder)
    hr_media = dataclasses.replace(CFG.media, height=64, width=64)
    for item in read_manifest(manifest).to_pylist():
        hr = np.stack([c.frames for c in decode(item["path"], hr_media).clips])
        low = hr.reshape(len(hr), 17, 32, 2, 32, 2, 3).astype(np.float32).mean((3, 5)).round().astype(np.uint8)
        expected = {"video": video.encode(video_to_tensor(low)), "hr_video": video.encode(video_to_tensor(hr)),
                    "structure": video.encode(video_to_tensor(structure_video(low)))}
        mine = [r for r in rows if r["id"] == item["id"]]
        assert len(mine) == 2
        for row in mine:
            assert row["hr_video_shape"] == [5, 8, 8] and row["structure_shape"] == [5, 4, 4]
            assert row["audio_tokens"] is None and row["has_audio"]
            for name, codes in expected.items():
                np.testing.assert_array_equal(np.reshape(row[f"{name}_tokens"], row[f"{name}_shape"]),
                                              codes[row["clip_index"]].numpy())
            (embeddings,) = encoder.condition([item["caption"]])
            assert row["text_shape"] == [len(embeddings.embeddings), encoder.width]
            np.testing.assert_array_equal(np.array(row["text_embeddings"], np.float16).reshape(row["text_shape"]),
                                          embeddings.embeddings.numpy().astype(np.float16))

    args = job_args(manifest, out, tokenizers, *options, audio=False)
    args[args.index("--video-tokenizer") + 1] = str(tokenizers / "video2")
    assert main(args) == 0
    second = next(p for p in out.iterdir() if p.name not in (JOBS_DIR, first.name))
    assert digest(first) == before, "re-tokenizing must leave the old shards untouched"
    assert open_shards(str(second)).meta.tokenizers["video"]["fingerprint"] != \
        open_shards(str(first)).meta.tokenizers["video"]["fingerprint"]
    with pytest.raises(ShardError, match="2 tokenizations"):
        open_shards(str(out))
    with pytest.raises(ShardError, match="refusing to mix tokenizer fingerprints"):
        open_shards([str(first), str(second)])
    assert shards_command(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("text embeddings: 4 clips, width 8") == 2 and "hr_video tokens: 4 clips (5x8x8 x4)" in text
    assert first.name in text and second.name in text


def test_bad_arguments_are_named(tokenizers, corpus, tmp_path, capsys):
    args = job_args(corpus, tmp_path / "out", tokenizers, audio=False)
    args[args.index("--video-tokenizer") + 1] = str(tokenizers / "audio")
    assert main(args) == 2
    assert "a 'soundstream' checkpoint, expected 'magvit'" in capsys.readouterr().err
    assert main(job_args(corpus, tmp_path / "out", tokenizers, "--set", "media.height=36")) == 2
    assert "cannot take 17x36x32 clips" in capsys.readouterr().err
    assert main(job_args(tmp_path / "none.jsonl", tmp_path / "out", tokenizers)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(job_args(corpus, tmp_path / "out", tokenizers, "--max-error-fraction", "2")) == 2
    assert "max_error_fraction must lie in [0, 1]" in capsys.readouterr().err
    assert main(job_args(corpus, tmp_path / "out", tokenizers, "--set", "plan_memory_mb=8")) == 2
    assert "plan_memory_mb must be >= 16" in capsys.readouterr().err
    assert main(job_args(corpus, tmp_path / "out", tokenizers, "--set", "record_flush_s=-1")) == 2
    assert "record_flush_s must be >= 0" in capsys.readouterr().err
    assert main(job_args(corpus, "s3://bucket/tokens", tokenizers, "--track")) == 2  # before any work
    assert "--out s3://bucket/tokens is an object-store URI, so the embedded MLflow store" in capsys.readouterr().err
    # An OUT that an earlier version of the job started (one JSON record per shard) is not resumed.
    fingerprint = TokenizeJob(CFG, str(corpus), str(tmp_path / "old"), str(tokenizers / "video"),
                              str(tokenizers / "audio")).fingerprint
    (tmp_path / "old" / "_jobs" / fingerprint).mkdir(parents=True)
    (tmp_path / "old" / "_jobs" / fingerprint / "job.json").write_text("{}")
    assert main(job_args(corpus, tmp_path / "old", tokenizers)) == 2
    assert f"{fingerprint} was started by an earlier version of the tokenize job" in capsys.readouterr().err


def test_a_cluster_too_small_for_one_actor_per_pool_is_said():
    cfg = dataclasses.replace(CFG, decode_cpus=0.5, tokenizer_cpus=1.0, side_cpus=0.5)
    assert cpu_shortfall(cfg, audio=True, text=False, cpus=2) is None
    short = cpu_shortfall(cfg, audio=True, text=True, cpus=2)
    assert short.startswith("tokenize: one actor per pool needs 2.5 CPUs (decode 0.5, video tokenizer 1, audio "
                            "tokenizer 0.5, text encoder 0.5) and the cluster has 2: the job waits until nodes join")
    alone = cpu_shortfall(cfg, audio=False, text=False, cpus=0)  # an autoscaling cluster's head before any worker
    assert "needs 1.5 CPUs (decode 0.5, video tokenizer 1) and the cluster has 0:" in alone


def test_records_are_batched_checked_by_size_and_compacted(tokenizers, tmp_path, monkeypatch):
    """Without Ray: records written together, a record's shard done only while its file has the recorded size, a
    later record of a shard replacing an earlier one, and `finish` compacting every record file into one."""
    from tokenize_jobs import job as job_mod
    from tokenize_jobs.job import RecordLog, read_records, record_files
    from tokenize_jobs.plan import Generation

    job = TokenizeJob(CFG, "unused.jsonl", str(tmp_path / "out"), str(tokenizers / "video"))
    clock = [0.0]
    monkeypatch.setattr(job_mod.time, "monotonic", lambda: clock[0])

    def record(index, clips=3, size=10, errors=()):
        return {"index": index, "inputs": 2, "clips": clips, "first_id": f"{index}a", "last_id": f"{index}b",
                "bytes": size if clips else 0, "inputs_failed": len(errors), "inputs_partial": 0,
                "errors": [{"source": f"{e}.mp4", "id": e, "stage": "decode", "error_kind": "corrupt",
                            "message": "bad", "clips_kept": 0} for e in errors], "truncated": []}

    log = RecordLog(job.fs, job.records_dir, flush_s=30)
    for index in range(4):
        log.add(record(index, clips=0 if index == 2 else 3, errors=["x3"] if index == 3 else ()))
        clock[0] += 10  # the fourth record comes 30 s after the first: the four go into one file
    assert len(record_files(job.fs, job.records_dir)) == 1 and not log.pending
    log.add(record(4))
    log.flush()
    for index in (0, 1, 3, 4):
        (tmp_path / "out" / job.fingerprint).mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / job.fingerprint / f"shard-0000{index}.parquet").write_bytes(b"x" * 10)
    (tmp_path / "out" / job.fingerprint / "shard-00001.parquet").write_bytes(b"x" * 5)  # cut short
    assert job.finished_shards(5).tolist() == [0, 2, 3, 4]
    later = RecordLog(job.fs, job.records_dir, flush_s=0)  # a later run redid shard 1: its record replaces the first
    later.add(record(1, size=5))
    assert job.finished_shards(5).tolist() == [0, 1, 2, 3, 4]
    assert sorted(r["index"] for t in read_records(job.fs, record_files(job.fs, job.records_dir)) for r in
                  t.select(["index"]).to_pylist()) == [0, 1, 2, 3, 4]

    generations = [Generation(0, 10, 0, 5, 1, "0" * 64, "unused.jsonl", "t0")]
    summary = job.finish({"fingerprint": job.fingerprint}, generations)
    counts = (summary["shards"], summary["clips"], summary["inputs_failed"], summary["shards_with_clips"])
    assert counts == (5, 12, 1, 4)
    assert summary["failed_examples"] == [{"shard": 3, "source": "x3.mp4", "id": "x3", "stage": "decode",
                                           "error_kind": "corrupt", "message": "bad", "clips_kept": 0}]
    (compacted,) = record_files(job.fs, job.records_dir)
    assert compacted.endswith("-compacted.parquet") and job.finished_shards(5).tolist() == [0, 1, 2, 3, 4]
    assert pq.read_table(job.errors_path).column("id").to_pylist() == ["x3"]


# ---------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_become_error_rows_and_the_guard_fails_the_job(ray_local, corpus, tokenizers, tmp_path, capsys):
    (tmp_path / "notes.mp4").write_text("not a video at all\n")
    os.mkfifo(tmp_path / "stalled.mp4")  # nobody ever writes: ffmpeg hangs until the timeout kills it
    good = read_manifest(corpus).column("path")[0].as_py()
    (tmp_path / "a_folder").mkdir()
    rows = [{"path": good, "id": "good"}, {"path": "missing.mp4", "id": "missing"},
            {"path": "notes.mp4", "id": "notes"}, {"path": "stalled.mp4", "id": "stalled"},
            {"path": "a_folder", "id": "folder"}, {"path": "/etc/passwd", "id": "passwd"}]
    if REAL.exists():
        rows.append({"path": str(REAL / "video_90.mov"), "id": "short"})  # 0.1 s: too short when short="skip"
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    extra = ["--set", "media.timeout_s=1.0", "--set", 'media.short="skip"', "--track"]
    assert main(job_args(manifest, out, tokenizers, *extra, audio=False)) == 1
    captured = capsys.readouterr()
    assert f"{len(rows) - 1} of {len(rows)} inputs failed" in captured.err and "errors.parquet" in captured.err
    assert "tokenize failed" in captured.out
    folder = only_fingerprint(out)
    errors = {e["source"]: e for e in pq.read_table(out / JOBS_DIR / folder.name / "errors.parquet").to_pylist()}
    kinds = {source: e["error_kind"] for source, e in errors.items()}
    expected = {"missing.mp4": "missing", "notes.mp4": "not_media", "stalled.mp4": "timeout",
                "a_folder": "not_media", "/etc/passwd": "not_media"}
    if REAL.exists():
        expected[str(REAL / "video_90.mov")] = "too_short"
    assert kinds == expected
    assert all(e["stage"] == "decode" and e["message"] and e["clips_kept"] == 0 for e in errors.values())
    # The console names the first five failed inputs (by shard, then id) with their error kinds and messages.
    named = sorted(errors.values(), key=lambda e: e["id"])
    for e in named[:5]:
        assert f"failed: {e['source']}: {e['error_kind']}: {e['message'][:40]}" in captured.out, captured.out
    for e in named[5:]:
        assert f"failed: {e['source']}:" not in captured.out
    rest = f"... and {len(named) - 5} more; " if len(named) > 5 else ""
    assert f"  {rest}every failed input: {out / JOBS_DIR / folder.name / 'errors.parquet'}" in captured.out
    assert open_shards(str(out)).to_table(["id"]).column("id").to_pylist() == ["good", "good"]

    from pipeline.tracking import default_uri, search_runs

    (run,) = search_runs(default_uri(out / JOBS_DIR), "videopoet")
    assert run.data.metrics["inputs_failed"] == len(rows) - 1 and run.info.status == "FAILED"


@pytest.mark.heavy
def test_the_whole_real_corpus(ray_local, tokenizers, tmp_path, capsys):
    if not REAL.exists():
        pytest.skip(f"{REAL} not present")
    out = tmp_path / "out"
    args = job_args(REAL / "captions.jsonl", out, tokenizers, "--inputs-per-shard", "4")
    assert main(args + ["--max-error-fraction", "0.1"]) == 1  # 4 of 13 inputs fail
    assert main(args + ["--max-error-fraction", "0.5"]) == 0  # same tokenization: every shard is skipped
    assert "0 written, 4 already done" in capsys.readouterr().out
    folder = only_fingerprint(out)
    errors = {e["source"]: e for e in pq.read_table(out / JOBS_DIR / folder.name / "errors.parquet").to_pylist()}
    assert {s: e["error_kind"] for s, e in errors.items()} == {
        "result.webm": "empty", "example.wav": "no_video", "crunching.mp3": "no_video", "corrupted.mp4": "corrupt"}
    rows = open_shards(str(out)).to_table().to_pylist()
    clips = {}
    for row in rows:
        clips.setdefault(row["source"], []).append(row)
    # A file damaged part-way keeps the clips decoded before the damage, and the error row says how many.
    assert len(clips["corrupted.mp4"]) == errors["corrupted.mp4"]["clips_kept"] >= 1
    sources = [json.loads(line)["path"] for line in (REAL / "captions.jsonl").read_text().splitlines()]
    assert set(clips) | {s for s, e in errors.items() if e["clips_kept"] == 0} == set(sources)
    assert all(r["audio_tokens"] is None and not r["has_audio"] for r in clips["example.mp4"])
    assert all(r["audio_shape"] == [4, 106] for r in clips["flipping_a_pancake.mkv"])
    assert clips["video_90.mov"][0]["padded_frames"] > 0
    assert len({r["clip_id"] for r in rows}) == len(rows)
    assert shards_command(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "errors: 4 (corrupt 1, empty 1, no_video 2)" in text and "status done" in text


# ---------------------------------------------------------------------------------------------------- processes

def session_pids(sid):
    pids = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return pids


def end_session(proc, grace_s=20.0):
    """Wait for everything started in `proc`'s session (Ray's processes included) to exit; SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.heavy
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tokenized, ray_local, corpus, tokenizers, tmp_path):
    # The driver writes a tokenizer batch's shards within milliseconds of each other, so on a fast machine a kill on
    # seeing the first may come after the last: such an attempt proves nothing and starts over in a fresh OUT.
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        args = job_args(corpus, out, tokenizers, "--inputs-per-shard", "1")
        log = tmp_path / f"job{attempt}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "tokenize_jobs.job", *args], stdout=f,
                                    stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        folder = out / only_fingerprint(tokenized).name  # same tokenizers and settings: the same fingerprint
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(folder.glob("shard-*.parquet")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        end_session(proc)
        done_before = digest(folder) if folder.exists() else {}
        assert done_before, f"the job never finished a shard: {log.read_text()[-3000:]}"
        if len(done_before) < 6:
            break
    else:
        pytest.fail("the job had finished before every kill in 4 attempts: nothing was interrupted")

    assert main(args) == 0
    assert {k: v for k, v in digest(folder).items() if k in done_before} == done_before  # finished shards kept
    reference = only_fingerprint(tokenized)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in sorted(reference.iterdir()):
        assert pq.read_table(folder / path.name).equals(pq.read_table(path))
    clip_ids = open_shards(str(folder)).to_table(["clip_id"]).column("clip_id").to_pylist()
    assert len(clip_ids) == len(set(clip_ids)) == 12
    job = json.loads((out / JOBS_DIR / folder.name / "job.json").read_text())
    assert job["status"] == "done" and job["clips"] == 12


def manifest_lines(corpus, keep, name):
    """The corpus manifest's rows `keep` (indices, in that order), beside it: the same relative paths and columns, so
    the clips equal the reference run's."""
    lines = corpus.read_text().splitlines()
    path = corpus.parent / f"{name}-{os.getpid()}-{time.monotonic_ns()}.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in keep))
    return path


def all_clips(folder):
    table = open_shards(str(folder)).to_table()
    return table.take(pc.sort_indices(table, [("clip_id", "ascending")]))


@pytest.mark.heavy
def test_a_grown_manifest_tokenizes_only_its_new_inputs_exactly_once_through_a_sigkill(tokenized, ray_local, corpus,
                                                                                       tokenizers, capsys):
    order = [4, 1, 5, 0, 3, 2]
    # The driver writes the three new shards within milliseconds of each other, so a kill on seeing the first may
    # come after the last: such an attempt proves nothing and starts over in a fresh OUT.
    for attempt in range(4):
        out = corpus.parent / f"grown-out-{time.monotonic_ns()}"
        first = manifest_lines(corpus, order[:3], "first")  # rows 4, 1, 5
        assert main(job_args(first, out, tokenizers, "--inputs-per-shard", "1")) == 0
        folder = out / only_fingerprint(tokenized).name
        old = digest(folder)
        assert sorted(old) == [f"shard-0000{i}.parquet" for i in range(3)]
        grown = manifest_lines(corpus, order[::-1], "grown")  # every row, the old ones among the new, in another order

        args = job_args(grown, out, tokenizers, "--inputs-per-shard", "1")
        log = corpus.parent / f"grown-{time.monotonic_ns()}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "tokenize_jobs.job", *args], stdout=f,
                                    stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and len(digest(folder)) == 3:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        end_session(proc)
        if 3 < len(digest(folder)) < 6:
            break
    else:
        pytest.fail(f"not interrupted part-way in 4 attempts: {log.read_text()[-3000:]}")

    capsys.readouterr()
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "6 inputs" in summary and "0 new in this run, in 2 generations" in summary
    after = digest(folder)
    assert {k: after[k] for k in old} == old, "the first run's shards must never move"
    assert sorted(after) == [f"shard-0000{i}.parquet" for i in range(6)]
    ids = [json.loads(line)["id"] for line in corpus.read_text().splitlines()]
    new_ids = sorted(ids[i] for i in order[3:])
    for k, key in enumerate(new_ids):  # the new inputs, sorted among themselves, in shards after the old ones
        assert set(pq.read_table(folder / f"shard-0000{3 + k}.parquet").column("id").to_pylist()) == {key}
    # Clip for clip the uninterrupted single run of the whole manifest: nothing missing, nothing twice.
    assert all_clips(folder).equals(all_clips(only_fingerprint(tokenized)))
    job = json.loads((out / JOBS_DIR / folder.name / "job.json").read_text())
    assert [(g["inputs"], g["first_shard"], g["shards"]) for g in job["generations"]] == [(3, 0, 3), (3, 3, 3)]
    assert job["status"] == "done" and job["inputs"] == 6 and job["clips"] == 12
    assert shards_command(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "generations: 2: 3 inputs in shards 0-2" in text and "3 inputs in shards 3-5" in text
    assert "clips: 12" in text and "inputs: 6 (6 ok" in text


@pytest.mark.heavy
def test_a_node_lost_mid_run_changes_no_clip(tokenized, corpus, tokenizers, tmp_path):
    """`benchmarks/multinode.py`: a 0-CPU head and two 1-CPU worker nodes; as soon as the video tokenizer actor has
    started, the node running it is removed without warning and a fresh one joins. The job finishes by itself (or a
    re-run does), and its shards equal the uninterrupted single-node run's, clip for clip."""
    out = tmp_path / "out"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "multinode.py"),
               "--app", "tokenize", "--out", str(out), "--scenario", "replace", "--nodes", "2",
               "--", "--manifest", str(corpus), "--video-tokenizer", str(tokenizers / "video"),
               "--audio-tokenizer", str(tokenizers / "audio"), "--config", "debug", "--inputs-per-shard", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=1200)
    log = out.parent / "out.log"
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:] + log.read_text()[-3000:]
    outcome = json.loads(result.stdout.splitlines()[-1])
    print("multi-node:", outcome)
    assert outcome["shards_at_removal"] < 6, "the node was removed after the job had finished"
    reference = only_fingerprint(tokenized)
    folder = out / reference.name
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in sorted(reference.iterdir()):
        assert pq.read_table(folder / path.name).equals(pq.read_table(path)), path.name
    job = json.loads((out / JOBS_DIR / folder.name / "job.json").read_text())
    assert job["status"] == "done" and job["clips"] == 12 and job["inputs_failed"] == 0


@pytest.mark.heavy
def test_s3_input_and_output(tokenized, corpus, tokenizers, tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        s3 = pa_fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                access_key="testing", secret_key="testing", allow_bucket_creation=True)
        s3.create_dir("corpus")
        for path in [corpus, *sorted((corpus.parent / "videos").iterdir())]:
            with s3.open_output_stream(f"corpus/{path.relative_to(corpus.parent).as_posix()}") as f:
                f.write(path.read_bytes())
        for path in (tokenizers / "video").iterdir():
            with s3.open_output_stream(f"corpus/tokenizer/{path.name}") as f:
                f.write(path.read_bytes())
        args = ["--manifest", "s3://corpus/manifest.jsonl", "--out", "s3://corpus/tokens", "--video-tokenizer",
                "s3://corpus/tokenizer", "--audio-tokenizer", str(tokenizers / "audio"), "--config", "debug",
                "--inputs-per-shard", "1"]
        proc = subprocess.Popen([sys.executable, "-m", "tokenize_jobs.job", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env={**ENV, **env}, start_new_session=True)
        output = proc.communicate(timeout=300)[0].decode()
        end_session(proc)
        assert proc.returncode == 0, output[-3000:]
        reference = only_fingerprint(tokenized)
        shards = open_shards("s3://corpus/tokens")
        assert shards.fingerprint == reference.name
        assert [p.rsplit("/", 1)[1] for p in shards.files] == sorted(p.name for p in reference.iterdir())
        for path in shards.files:
            with s3.open_input_file(path) as f:
                assert pq.read_table(f).equals(pq.read_table(reference / path.rsplit("/", 1)[1]))
        assert s3.get_file_info(f"corpus/tokens/{JOBS_DIR}/{reference.name}/errors.parquet").size > 0
        assert not [i for i in s3.get_file_info(pa_fs.FileSelector("corpus/tokens", recursive=True))
                    if ".tmp-" in i.path]
        # Re-running skips every shard: the shard keys are written once.
        before = {i.path: i.mtime for i in s3.get_file_info(pa_fs.FileSelector(f"corpus/tokens/{reference.name}"))}
        assert main(args) == 0
        after = {i.path: i.mtime for i in s3.get_file_info(pa_fs.FileSelector(f"corpus/tokens/{reference.name}"))}
        assert after == before and len(shard_files(s3, f"corpus/tokens/{reference.name}")) == 6
    finally:
        server.stop()
