import collections
import itertools
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config, to_dict
from pipeline.oracle import read_video_attributes
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.synth import (ATTRIBUTES, COLORS, MOTIONS, PITCH_HZ, SHAPES, SynthConfig, attribute_key,
                            attribute_schedule, caption, held_out_combinations, main, plan, render_audio, render_video)

COMBINATIONS = list(itertools.product(SHAPES, COLORS, MOTIONS))


def spread(counts: collections.Counter, keys) -> int:
    values = [counts.get(k, 0) for k in keys]
    return max(values) - min(values)


@pytest.mark.parametrize("n", [1, 5, 12, 13, 30, 47, 48, 49, 100, 144])
def test_schedule_balanced_for_every_length(n):
    rows = attribute_schedule(seed=3, n=n)
    for name, values in ATTRIBUTES.items():
        assert spread(collections.Counter(r[name] for r in rows), values) <= 1, name
    combos = collections.Counter((r["shape"], r["color"], r["motion"]) for r in rows)
    assert spread(combos, COMBINATIONS) <= 1
    if n % len(COMBINATIONS) == 0:
        assert set(combos) == set(COMBINATIONS)


def test_schedule_seeded_order():
    assert attribute_schedule(5, 48) == attribute_schedule(5, 48)
    assert attribute_schedule(5, 48) != attribute_schedule(6, 48)
    assert attribute_schedule(5, 20) == attribute_schedule(5, 48)[:20]


def test_plan_and_render_deterministic():
    cfg = SynthConfig(frames=12)
    a, b = plan(cfg, 11, 8), plan(cfg, 11, 8)
    assert a == b
    assert plan(cfg, 11, 4) == a[:4]  # a bigger corpus extends a smaller one
    assert [s.start for s in plan(cfg, 12, 8)] != [s.start for s in a]
    for spec_a, spec_b in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(render_video(spec_a, cfg), render_video(spec_b, cfg))
        np.testing.assert_array_equal(render_audio(spec_a, cfg), render_audio(spec_b, cfg))
    assert len({s.id for s in a}) == len(a)


def test_captions():
    assert caption({"shape": "circle", "color": "red", "motion": "left"}) == "a red circle moving left"
    specs = plan(SynthConfig(), 0, 48)
    assert len({s.caption for s in specs}) == 48
    for s in specs:
        assert s.caption == f"a {s.color} {s.shape} moving {s.motion}"


def test_val_split_is_a_small_even_share():
    specs = plan(SynthConfig(val_fraction=0.1), 0, 100)
    val = [i for i, s in enumerate(specs) if s.split == "val"]
    assert len(val) == 10 and np.all(np.diff(val) == 10)
    assert all(s.split == "train" for s in plan(SynthConfig(val_fraction=0.0), 0, 20))


def test_frames_and_audio():
    cfg = SynthConfig()
    spec = plan(cfg, 0, 1)[0]
    frames, audio = render_video(spec, cfg), render_audio(spec, cfg)
    assert frames.dtype == np.uint8 and frames.shape == (51, 128, 160, 3)
    assert audio.dtype == np.float32 and audio.shape == (34000,)  # 2.125 s at 16 kHz
    assert 0.2 < np.abs(audio).max() <= spec.volume
    # The strongest partial is the shape's pitch (an independent FFT check of the audio mapping).
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.fft.rfftfreq(len(audio), 1 / cfg.sample_rate)[spectrum.argmax()] - PITCH_HZ[spec.shape]) < 2


@pytest.mark.parametrize("flavor", ["debug", "demo", "paper"])
def test_a_steady_sound_encodes_to_a_steady_latent(flavor):
    """Every partial a multiple of the audio tokenizers' frame rate, all in phase: with the tremolo off, each frame of
    a clip holds the same waveform, so a (shift-equivariant, here random-init) SoundStream encoder gives every frame
    past its warm-up the same latent, hence the same codes. Clips of one combination at one loudness sound alike."""
    torch.manual_seed(0)
    model = SoundStreamModel(load_config(SoundStreamConfig, flavor, kind="audio_tokenizer")).eval()
    cfg = SynthConfig(tremolo_depth=0.0, sample_rate=model.config.sample_rate)
    specs = [s for s in plan(cfg, 0, 48) if s.color == "blue"][:3]
    assert {s.shape for s in specs} == set(SHAPES)
    audio = torch.from_numpy(np.stack([render_audio(s, cfg) for s in specs]))
    with torch.no_grad():
        latent = model.encode_latent(audio)[:, 40:-2]  # past the warm-up: the first frames see the fade-in
    assert torch.allclose(latent, latent[:, :1].expand_as(latent), atol=1e-4 * latent.abs().max())
    first = specs[0]
    twin = replace(plan(cfg, 1, 1)[0], shape=first.shape, color=first.color, motion=first.motion, volume=first.volume)
    assert twin.start != first.start and np.array_equal(render_audio(twin, cfg), render_audio(first, cfg))


def test_object_stays_inside_center_square():
    cfg = SynthConfig(width=192, height=128, frames=9)
    for spec in plan(cfg, 1, 48):
        rgb = render_video(spec, cfg).astype(np.int16)
        chroma = rgb.max(-1) - rgb.min(-1)
        assert chroma[:, :, :32].max() == 0 and chroma[:, :, -32:].max() == 0, spec.id
        inner = chroma[:, :, 32:-32]  # the margin (0.02 of 128 px) keeps even antialiased edges 2 px off the border
        assert inner[:, :2].max() == 0 and inner[:, -2:].max() == 0, spec.id
        assert inner[:, :, :2].max() == 0 and inner[:, :, -2:].max() == 0, spec.id
        assert (chroma[0] > 0).any() and (chroma[-1] > 0).any()


def test_rendering_is_fast():
    import time

    cfg = SynthConfig()
    specs = plan(cfg, 0, 20)
    began = time.perf_counter()
    for spec in specs:
        render_video(spec, cfg), render_audio(spec, cfg)
    assert time.perf_counter() - began < 5.0  # ~25 ms a clip; loose for a shared machine


def test_one_color_variant_is_the_plain_schedule():
    specs = plan(SynthConfig(color_variants=1), 4, 60)
    assert [s.attributes for s in specs] == attribute_schedule(4, 60)


@pytest.mark.parametrize("variants", [2, 4])
def test_color_variants_share_a_geometry_and_differ_in_color(variants):
    cfg = SynthConfig(frames=17, fps=8, color_variants=variants)
    specs = plan(cfg, 2, 96 * variants)
    assert plan(cfg, 2, 5) == specs[:5]  # still extends
    combos = collections.Counter(attribute_key(s.attributes) for s in specs)
    assert set(combos) == set(COMBINATIONS) and spread(combos, COMBINATIONS) == 0
    for g in range(0, len(specs), variants):
        group = specs[g: g + variants]
        assert len({s.color for s in group}) == variants and len({s.split for s in group}) == 1
        geometry = {(s.shape, s.motion, s.size, s.start, s.end, s.background, s.volume) for s in group}
        assert len(geometry) == 1
    assert sum(s.split == "val" for s in specs) == 9 * variants  # 9 of the 96 geometries
    # Rendered, the siblings differ only where the object is, and the oracle reads each one's own color.
    first, second = specs[:2]
    a, b = render_video(first, cfg), render_video(second, cfg)
    background = (a == b).all(-1)
    assert 0.8 < background.mean() < 1
    assert read_video_attributes(a) == first.attributes and read_video_attributes(b) == second.attributes


@pytest.mark.parametrize("change, field", [
    ({"width": 16}, "32x32"), ({"size": (0.4, 0.3)}, "size"), ({"travel": (0.6, 0.7)}, "center square"),
    ({"val_fraction": 1.0}, "val_fraction"), ({"frames": 1}, "frames"), ({"color_variants": 0}, "color_variants"),
    ({"color_variants": 5}, "color_variants"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**change)


def test_config_overrides():
    cfg = load_config(SynthConfig, None, ["frames=17", "fps=8", "size=[0.3, 0.32]"], kind="synth")
    assert (cfg.frames, cfg.fps, cfg.size, cfg.seconds) == (17, 8, (0.3, 0.32), 2.125)
    with pytest.raises(ConfigError, match="colour"):
        load_config(SynthConfig, None, ["colour=1"])


def test_main_end_to_end(tmp_path, capsys):
    pytest.importorskip("pipeline.media")
    out = tmp_path / "corpus"
    argv = ["--out", str(out), "--clips", "5", "--seed", "2", "--set", "frames=24", "--set", "val_fraction=0.2"]
    assert main(argv) == 0
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1 and "5 clips" in summary
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and sum(r["split"] == "val" for r in rows) == 1
    for row in rows:
        assert set(row) == {"path", "caption", "id", "split", "shape", "color", "motion"}
        assert row["caption"] == caption(row)
        video = out / row["path"]
        assert video.suffix == ".mp4" and video.stat().st_size > 1000
        assert video.read_bytes()[4:8] == b"ftyp"
    saved = json.loads((out / "synth_config.json").read_text())
    assert saved == to_dict(SynthConfig(frames=24, val_fraction=0.2))


def test_cli_same_seed_same_manifest(tmp_path):
    pytest.importorskip("pipeline.media")

    def run(out):
        cmd = [sys.executable, "-m", "pipeline.cli", "synth", "--out", str(out), "--clips", "4", "--seed", "9",
               "--set", "frames=12"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return (out / "manifest.jsonl").read_text()

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first == second and len(first.splitlines()) == 4


def test_main_rejects_bad_arguments(tmp_path, capsys):
    for argv in (["--clips", "0"], ["--set", "size=[0.6, 0.7]"], ["--set", "colour=red"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path), *argv])
        assert exit_info.value.code == 2
    assert "center square" in capsys.readouterr().err
    assert not (tmp_path / "manifest.jsonl").exists()


def test_held_out_combinations_leave_every_pair_of_values_in_training():
    world = set(itertools.product(*ATTRIBUTES.values()))
    assert held_out_combinations(0) == set()
    for count in (1, 8, 16):
        held = held_out_combinations(count)
        assert len(held) == count and held <= world and held == held_out_combinations(count)  # deterministic
        seen = world - held
        for i, j in itertools.combinations(range(3), 2):
            assert {(c[i], c[j]) for c in held} <= {(c[i], c[j]) for c in seen}
    assert attribute_key({"motion": "up", "shape": "circle", "color": "red"}) == ("circle", "red", "up")
