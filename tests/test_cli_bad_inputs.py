"""No traceback reaches a user for a bad input or argument: every subcommand refuses each bad input (missing, empty,
not UTF-8, the wrong kind of folder or checkpoint) with one line on stderr that names it, and exit code 2 (probe's
documented 1 for a file that failed), before any heavy work (Ray, training, MLflow). Runs in-process: a case that
got as far as Ray would show as a slow test, or as a traceback."""

import sys
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.checkpoint import read_metadata, save_checkpoint
from pipeline.cli import main
from pipeline.config import to_dict
from pipeline.media import MediaConfig
from pipeline.shards import ShardMeta, clips_table
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.text import TextConfig

NOT_UTF8 = b"path,caption\n\xff\xfe.mp4,\xff\n"


def fake_shards(folder, tokenizers_root) -> None:
    """One shard file of two captioned clips with made-up codes: enough for the LLM app's checks before training."""
    tokenizers = {}
    for role in ("video", "audio"):
        meta = read_metadata(tokenizers_root / role)
        tokenizers[role] = {**{k: meta[k] for k in ("kind", "config", "fingerprint")},
                            "location": str(tokenizers_root / role)}
    rows = 2
    batch = {"clip_id": ["a#00000", "b#00000"], "id": ["a", "b"], "source": ["a.mp4", "b.mp4"],
             "clip_index": [0, 0], "start": [0.0, 0.0], "end": [1.0, 1.0], "caption": ["a red circle", "a blue box"],
             "video_tokens": np.zeros((rows, 80), np.int32), "video_shape": np.tile([5, 4, 4], (rows, 1)),
             "audio_tokens": np.zeros((rows, 8), np.int16), "audio_shape": np.tile([2, 4], (rows, 1)),
             "has_audio": [True, True], "padded_frames": [0, 0], "source_fps": [8.0, 8.0],
             "source_width": [32, 32], "source_height": [32, 32], "source_duration": [1.0, 1.0]}
    meta = ShardMeta("0123456789abcdef", tokenizers, {"media": {}, "hr": False, "structure": False},
                     {"index": 0, "inputs": 2, "clips": 2, "first_id": "a", "last_id": "b"}, "2024-01-01T00:00:00")
    folder.mkdir(parents=True)
    pq.write_table(clips_table(batch).replace_schema_metadata(meta.to_metadata()), folder / "shard-00000.parquet")


@pytest.fixture(scope="module")
def p(llm_export, tmp_path_factory):
    """Every bad input of the cases below, and the good ones they sit beside."""
    root = llm_export(["a red circle", "a blue box"], MediaConfig(height=32, width=32))
    bad = tmp_path_factory.mktemp("bad")
    (bad / "empty.csv").write_bytes(b"")
    (bad / "empty.jsonl").write_bytes(b"")
    (bad / "latin1.csv").write_bytes(NOT_UTF8)
    (bad / "folder").mkdir()
    (bad / "folder" / "notes.txt").write_text("not a dataset\n")
    (bad / "empty").mkdir()
    (bad / "junk").mkdir()
    (bad / "junk" / "notes.txt").write_text("not parquet\n")
    (bad / "junk" / "junk.parquet").write_bytes(b"not parquet either")
    (bad / "junk_shard").mkdir()
    (bad / "junk_shard" / "shard-00000.parquet").write_bytes(b"PAR1 not really PAR1")
    (bad / "latin1.txt").write_bytes(b"\xff\xfe a prompt\n")
    (bad / "not_media.mp4").write_bytes(b"\x00" * 64)
    (bad / "good.jsonl").write_text('{"path": "clip.mp4", "caption": "a red circle"}\n')
    fake_shards(bad / "shards", root)
    (bad / "garbled").mkdir()
    (bad / "garbled" / "config.json").write_bytes(b"\xff\xfe{}")
    (bad / "listed").mkdir()
    (bad / "listed" / "config.json").write_text("[1, 2]")
    sr = SuperResConfig(grid=(5, 8, 8), windows=((1, 8, 2), (1, 2, 8), (5, 2, 2)), bits=4, width=16, heads=2,
                        blocks=1, mlp_ratio=2, text_dim=8, text_vocab=8)
    save_checkpoint(root / "sr" / "model", SuperResTransformer(sr), sr,
                    extra={"tokenizers": {"video": {"location": str(root / "video")}}, "text": to_dict(TextConfig()),
                           "media": {"media": {}}})
    (root / "sr" / "model" / "words.json").write_text((root / "run" / "model" / "words.json").read_text())
    return SimpleNamespace(root=root, bad=bad, video=root / "video", audio=root / "audio", llm=root / "run",
                           missing=bad / "missing", out=bad / "out")


# Each command with its output in p.out, unless `extra` names another `--out` (argparse keeps the last).
def tokenize(p, manifest, tokenizer=None, *extra):
    return ["tokenize", "--manifest", str(manifest), "--out", str(p.out / "tokenize"), "--config", "debug",
            "--video-tokenizer", str(tokenizer or p.video), *extra]


def train_tokenizer(p, modality, manifest, *extra):
    return ["train", f"{modality}-tokenizer", "--config", "debug", "--manifest", str(manifest),
            "--out", str(p.out / f"{modality}-tokenizer"), *extra]


def train(p, target, data, *extra):
    return ["train", target, "--config", "debug", "--data", str(data), "--out", str(p.out / target), *extra]


def generate(p, checkpoint, *extra):
    return ["generate", "--checkpoint", str(checkpoint), "--task", "text_to_video", "--prompt", "a red circle",
            "--out", str(p.out / "generate.mp4"), *extra]


def eval_(p, checkpoint, prompts="synthetic", *extra):
    return ["eval", "--checkpoint", str(checkpoint), "--prompts", str(prompts), "--out", str(p.out / "eval"),
            "--config", "debug", "--no-tracking", *extra]


def out_a_file(p):
    return "--out", str(p.bad / "good.jsonl")


def out_under_a_file(p):
    return "--out", str(p.bad / "good.jsonl" / "run")


T2V = ("--set", "mixture.weights={text_to_video = 1.0}")

# case -> (its argv from the paths, the name stderr must hold, the exit code)
CASES = {
    "tokenize manifest missing": (lambda p: tokenize(p, p.missing / "m.jsonl"), "m.jsonl", 2),
    "tokenize manifest empty csv": (lambda p: tokenize(p, p.bad / "empty.csv"), "empty.csv", 2),
    "tokenize manifest empty jsonl": (lambda p: tokenize(p, p.bad / "empty.jsonl"), "empty.jsonl", 2),
    "tokenize manifest not utf-8": (lambda p: tokenize(p, p.bad / "latin1.csv"), "latin1.csv", 2),
    "tokenize manifest a plain folder": (lambda p: tokenize(p, p.bad / "folder"), "folder", 2),
    "tokenize tokenizer missing": (lambda p: tokenize(p, p.bad / "good.jsonl", p.missing), "missing", 2),
    "tokenize tokenizer a plain folder": (lambda p: tokenize(p, p.bad / "good.jsonl", p.bad / "folder"), "folder", 2),
    "tokenize tokenizer of audio": (lambda p: tokenize(p, p.bad / "good.jsonl", p.audio), "audio", 2),
    "tokenize tokenizer an llm": (lambda p: tokenize(p, p.bad / "good.jsonl", p.llm / "model"), "model", 2),
    "tokenize tokenizer config not utf-8": (lambda p: tokenize(p, p.bad / "good.jsonl", p.bad / "garbled"),
                                            "garbled", 2),
    "tokenize tokenizer config a list": (lambda p: tokenize(p, p.bad / "good.jsonl", p.bad / "listed"), "listed", 2),
    "tokenize audio tokenizer of video": (lambda p: [*tokenize(p, p.bad / "good.jsonl"), "--audio-tokenizer",
                                                     str(p.video)], "video", 2),
    "tokenize config not utf-8": (lambda p: [*tokenize(p, p.bad / "good.jsonl"), "--config",
                                             str(p.bad / "latin1.csv")], "latin1.csv", 2),
    "shards info missing": (lambda p: ["shards", "info", str(p.missing)], "missing", 2),
    "shards info empty folder": (lambda p: ["shards", "info", str(p.bad / "empty")], "empty", 2),
    "shards info not parquet": (lambda p: ["shards", "info", str(p.bad / "junk")], "junk", 2),
    "shards info junk shard": (lambda p: ["shards", "info", str(p.bad / "junk_shard")], "junk_shard", 2),
    **{f"train {target} data {case}": (lambda p, t=target, d=data: train(p, t, d(p)), name, 2)
       for target in ("llm", "sr")
       for case, data, name in (("missing", lambda p: p.missing, "missing"),
                                ("empty folder", lambda p: p.bad / "empty", "empty"),
                                ("junk parquet", lambda p: p.bad / "junk", "junk"),
                                ("junk shard", lambda p: p.bad / "junk_shard", "shard-00000.parquet"))},
    "train llm init missing": (lambda p: train(p, "llm", p.bad / "shards", *T2V, "--init", str(p.missing)),
                               "missing", 2),
    "train llm init a tokenizer": (lambda p: train(p, "llm", p.bad / "shards", *T2V, "--init", str(p.video)),
                                   "video", 2),
    # The vocabulary follows the shards: setting it would do nothing.
    "train llm vocab set": (lambda p: train(p, "llm", p.bad / "shards", *T2V, "--set", "model.vocab.audio_levels=2"),
                            "model.vocab", 2),
    **{f"train {m}-tokenizer manifest {case}": (lambda p, m=m, f=f: train_tokenizer(p, m, f(p)), name, 2)
       for m in ("video", "audio")
       for case, f, name in (("missing", lambda p: p.missing / "m.csv", "m.csv"),
                             ("empty", lambda p: p.bad / "empty.csv", "empty.csv"),
                             ("not utf-8", lambda p: p.bad / "latin1.csv", "latin1.csv"),
                             ("a plain folder", lambda p: p.bad / "folder", "folder"))},
    "generate checkpoint missing": (lambda p: generate(p, p.missing), "missing", 2),
    "generate checkpoint empty folder": (lambda p: generate(p, p.bad / "empty"), "empty", 2),
    "generate checkpoint a tokenizer": (lambda p: generate(p, p.video), "video", 2),
    "generate checkpoint a super-resolution run": (lambda p: generate(p, p.root / "sr"), "sr", 2),
    "generate checkpoint config not utf-8": (lambda p: generate(p, p.bad / "garbled"), "garbled", 2),
    "generate image missing": (lambda p: generate(p, p.llm, "--task", "image_to_video", "--image",
                                                  str(p.missing / "cat.png")), "cat.png", 2),
    "generate image not media": (lambda p: generate(p, p.llm, "--task", "image_to_video", "--image",
                                                    str(p.bad / "not_media.mp4")), "not_media.mp4", 2),
    "generate sr a tokenizer": (lambda p: generate(p, p.llm, "--sr", str(p.video)), "video", 2),
    "eval checkpoint missing": (lambda p: eval_(p, p.missing), "missing", 2),
    "eval checkpoint a tokenizer": (lambda p: eval_(p, p.video), "video", 2),
    "eval checkpoint a super-resolution run": (lambda p: eval_(p, p.root / "sr"), "sr", 2),
    "eval prompts a folder": (lambda p: eval_(p, p.llm, p.bad / "empty"), "empty", 2),
    "eval prompts missing": (lambda p: eval_(p, p.llm, p.missing / "prompts.txt"), "prompts.txt", 2),
    "eval prompts not utf-8": (lambda p: eval_(p, p.llm, p.bad / "latin1.txt"), "latin1.txt", 2),
    "eval real missing": (lambda p: eval_(p, p.llm, "synthetic", "--real", str(p.missing / "real.jsonl")),
                          "real.jsonl", 2),
    "eval real not utf-8": (lambda p: eval_(p, p.llm, "synthetic", "--real", str(p.bad / "latin1.csv")),
                            "latin1.csv", 2),
    "demo negative steps": (lambda p: ["demo", "--out", str(p.out / "demo"), "--set", "llm.train.steps=-1"],
                            "steps", 2),
    "demo unknown key": (lambda p: ["demo", "--out", str(p.out / "demo"), "--set", "nope=1"], "nope", 2),
    "demo vocab set": (lambda p: ["demo", "--out", str(p.out / "demo"), "--set", "llm.model.vocab.text_size=9"],
                       "llm.model.vocab", 2),
    "demo config missing": (lambda p: ["demo", "--out", str(p.out / "demo"), "--config", str(p.missing / "c.toml")],
                            "c.toml", 2),
    "demo config a folder": (lambda p: ["demo", "--out", str(p.out / "demo"), "--config", str(p.bad / "empty")],
                             "empty", 2),
    "demo config not utf-8": (lambda p: ["demo", "--out", str(p.out / "demo"), "--config", str(p.bad / "latin1.csv")],
                              "latin1.csv", 2),
    "demo out on an object store": (lambda p: ["demo", "--out", "s3://bucket/runs/demo"], "s3://bucket/runs/demo", 2),
    "synth unknown key": (lambda p: ["synth", "--out", str(p.out / "synth"), "--set", "nope=1"], "nope", 2),
    "synth bad value": (lambda p: ["synth", "--out", str(p.out / "synth"), "--set", "fps=-1"], "fps", 2),
    "synth config missing": (lambda p: ["synth", "--out", str(p.out / "synth"), "--config", str(p.missing / "s.toml")],
                             "s.toml", 2),
    # An output folder that is a file, or lies under one: refused before any work rather than at its first write
    # (generate's --out is a file, and an existing one is overwritten).
    **{f"{command} out {case}": (lambda p, b=build, o=out: b(p, *o(p)), "good.jsonl", 2)
       for case, out in (("a file", out_a_file), ("under a file", out_under_a_file))
       for command, build in (
           ("tokenize", lambda p, *o: tokenize(p, p.bad / "good.jsonl", None, *o)),
           ("train llm", lambda p, *o: train(p, "llm", p.bad / "shards", *T2V, *o)),
           ("train sr", lambda p, *o: train(p, "sr", p.bad / "shards", *o)),
           ("train video-tokenizer", lambda p, *o: train_tokenizer(p, "video", p.bad / "good.jsonl", *o)),
           ("train audio-tokenizer", lambda p, *o: train_tokenizer(p, "audio", p.bad / "good.jsonl", *o)),
           ("eval", lambda p, *o: eval_(p, p.llm, "synthetic", *o)),
           ("demo", lambda p, *o: ["demo", *o]),
           ("synth", lambda p, *o: ["synth", "--clips", "1", *o]))},
    "generate out under a file": (lambda p: generate(p, p.llm, *out_under_a_file(p)), "good.jsonl", 2),
    "generate out a folder": (lambda p: generate(p, p.llm, "--out", str(p.bad / "empty")), "empty", 2),
    "shards info a file": (lambda p: ["shards", "info", str(p.bad / "good.jsonl")], "good.jsonl", 2),
    "probe file missing": (lambda p: ["probe", str(p.missing / "x.mp4")], "x.mp4", 1),
    "probe not media": (lambda p: ["probe", str(p.bad / "not_media.mp4")], "not_media.mp4", 1),
    "probe bad timeout": (lambda p: ["probe", "--timeout", "soon", str(p.bad / "not_media.mp4")], "soon", 2),
    "probe negative timeout": (lambda p: ["probe", "--timeout", "-1", str(p.bad / "not_media.mp4")], "timeout", 2),
    "probe no pixels": (lambda p: ["probe", "--max-pixels", "0", str(p.bad / "not_media.mp4")], "max-pixels", 2),
}


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def outcome(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_naming_it(case, p, capsys):
    build, name, code = CASES[case]
    argv = build(p)
    ray_before = ray_running()  # another test file of the session may have started it
    found, out, err = outcome(argv, capsys)
    assert "Traceback" not in out + err, (argv, err)
    assert found == code, (argv, out, err)
    assert ray_before or not ray_running(), argv  # refused before any heavy work
    assert not list(p.out.rglob("mlflow.db")), argv
    lines = err.strip().splitlines()
    if argv[0] == "probe" and code == 1:  # probe's documented contract: one JSON object per file, the error in it
        assert not err and len(out.strip().splitlines()) == 1 and '"error"' in out and name in out, (argv, out)
        return
    if lines and lines[0].startswith("usage:"):  # argparse's error: its usage block, then one error line
        assert ": error: " in lines[-1], (argv, err)
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("videopoet"), (argv, err)
    assert name in lines[0], (argv, err)
