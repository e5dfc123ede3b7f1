import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from pipeline.checkpoint import fingerprint, load_checkpoint, read_metadata, save_checkpoint
from pipeline.config import load_config, to_dict
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel


def magvit(seed: int = 0) -> MagvitModel:
    torch.manual_seed(seed)
    return MagvitModel(load_config(MagvitConfig, "debug", kind="video_tokenizer")).eval()


def soundstream_after_a_step() -> SoundStreamModel:
    torch.manual_seed(0)
    model = SoundStreamModel(load_config(SoundStreamConfig, "debug", kind="audio_tokenizer"))
    model.loss(torch.randn(2, 3200) * 0.3)  # initializes and updates the EMA codebooks (buffers)
    return model.eval()


def test_magvit_round_trip(tmp_path):
    model = magvit()
    save_checkpoint(tmp_path / "ckpt", model, model.config, extra={"step": 7, "psnr": 21.5})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, MagvitModel) and loaded.config == model.config and not loaded.training
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.fingerprint() == model.fingerprint()
    meta = read_metadata(tmp_path / "ckpt")
    assert meta["kind"] == "magvit" and meta["extra"] == {"step": 7, "psnr": 21.5}
    assert meta["config"] == to_dict(model.config) and meta["fingerprint"] == model.fingerprint()


def test_soundstream_round_trip_keeps_codebooks(tmp_path):
    model = soundstream_after_a_step()
    save_checkpoint(tmp_path, model, model.config)
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded, SoundStreamModel)
    assert bool(loaded.quantizer.codebooks[0].initialized)
    x = torch.randn(1, 3200) * 0.3
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_weights_are_plain_safetensors(tmp_path):
    model = magvit()
    save_checkpoint(tmp_path, model, model.config)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    assert json.loads((tmp_path / "config.json").read_text())["format"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_fingerprint_stability():
    a, b = magvit(seed=0), magvit(seed=0)
    assert a.fingerprint() == b.fingerprint() == fingerprint(a.config, a.state_dict())
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    assert magvit(seed=1).fingerprint() != a.fingerprint()
    with torch.no_grad():
        b.decoder.conv_out.conv.bias[0] += 1e-6
    assert b.fingerprint() != a.fingerprint()
    changed_config = replace(a.config, recon_loss="l1")
    assert fingerprint(changed_config, a.state_dict()) != a.fingerprint()


def test_tampered_or_incomplete_checkpoints(tmp_path):
    model = magvit()
    save_checkpoint(tmp_path, model, model.config)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["fingerprint"] = "0" * 16
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(tmp_path)
    meta["kind"] = "no-such-model"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown model kind"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "model.safetensors").unlink()
    meta["kind"] = "magvit"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_save_rejects_mismatched_config_and_unknown_models(tmp_path):
    model = magvit()
    with pytest.raises(TypeError, match="MagvitConfig"):
        save_checkpoint(tmp_path, model, load_config(SoundStreamConfig, "debug", kind="audio_tokenizer"))
    with pytest.raises(ValueError, match="not a registered model kind"):
        save_checkpoint(tmp_path, torch.nn.Linear(2, 2), model.config)



def test_an_object_store_export_fetched_by_many_at_once_and_again_once_changed(s3, tmp_path):
    """The actors of one node fetch an export at once: each gets whole files; a new export at the same location is
    fetched again; no staging folder is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.checkpoint import local_export
    from pipeline.storage import upload_folder

    def publish(model):
        save_checkpoint(tmp_path / "export", model, model.config)
        upload_folder(tmp_path / "export", "s3://bucket/exp/model", last=("config.json",))

    first, second = magvit(0), magvit(1)
    publish(first)
    cache = tmp_path / "cache"

    def fetch_and_load(_):
        copy = local_export("s3://bucket/exp/model", cache)
        return copy, load_checkpoint(copy).fingerprint()

    with ThreadPoolExecutor(8) as pool:
        ((copy, loaded),) = set(pool.map(fetch_and_load, range(8)))
    assert loaded == first.fingerprint()
    publish(second)
    assert local_export("s3://bucket/exp/model", cache) == copy
    assert load_checkpoint(copy).fingerprint() == second.fingerprint() != first.fingerprint()
    assert [p.name for p in copy.parent.iterdir()] == ["model"]
