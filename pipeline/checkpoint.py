"""Model checkpoints: `model.safetensors` (weights and buffers, no pickle) beside `config.json`, and fingerprints.

`config.json` holds the model kind, its config (`pipeline.config.to_dict`), the fingerprint and caller metadata
(`extra`: step, metrics, ...). `load_checkpoint` rebuilds the model class that the kind names and checks the weights
against the recorded fingerprint. Kinds map to (config class, model class) as import strings, so this module imports
no model code until a checkpoint of that kind is loaded; a new model adds one entry to `MODEL_KINDS`.

A fingerprint is the short sha256 of the config JSON (less its runtime fields: attention kernel, compilation) and every
tensor of the state dict (name, dtype, shape, bytes, in name order): token shards record the fingerprint of the
tokenizer that wrote them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pa_fs
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import from_dict, identity_json, to_dict
from pipeline.storage import atomic_path, is_uri, redact, resolve_filesystem, save_text

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FINGERPRINT_CHARS = 16
EXPORT_CACHE = Path.home() / ".cache" / "videopoet" / "exports"  # local copies of object-store exports

# kind -> ("module:ConfigClass", "module:ModelClass"); the model class is built as ModelClass(config)
MODEL_KINDS: dict[str, tuple[str, str]] = {
    "magvit": ("pipeline.magvit:MagvitConfig", "pipeline.magvit:MagvitModel"),
    "soundstream": ("pipeline.soundstream:SoundStreamConfig", "pipeline.soundstream:SoundStreamModel"),
    "llm": ("pipeline.llm:LLMConfig", "pipeline.llm:VideoPoetLM"),
    "superres": ("pipeline.superres:SuperResConfig", "pipeline.superres:SuperResTransformer"),
}


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def model_classes(kind: str) -> tuple[type, type]:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(sorted(MODEL_KINDS))})")
    config_target, model_target = MODEL_KINDS[kind]
    return _import(config_target), _import(model_target)


def kind_of(model: nn.Module) -> str:
    name = f"{type(model).__module__}:{type(model).__qualname__}"
    for kind, (_, model_target) in MODEL_KINDS.items():
        if model_target == name:
            return kind
    raise ValueError(f"{name} is not a registered model kind (add it to pipeline.checkpoint.MODEL_KINDS)")


def fingerprint(config: Any, state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(identity_json(config).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:FINGERPRINT_CHARS]


def save_checkpoint(directory: str | Path, model: nn.Module, config: Any, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` and `config.json` under `directory` (created); returns the directory."""
    kind = kind_of(model)
    config_class, _ = model_classes(kind)
    if not isinstance(config, config_class):
        raise TypeError(f"save_checkpoint: a {kind} model needs a {config_class.__name__}, got {type(config).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "config": to_dict(config),
        "fingerprint": fingerprint(config, tensors),
        "extra": extra or {},
    }
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    save_text(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint: format, kind, config, fingerprint, extra."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory}: no {CONFIG_FILE}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not UTF-8, or not JSON
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} holds a {type(meta).__name__}, not an object")
    missing = {"format", "kind", "config", "fingerprint"} - set(meta)
    if missing:
        raise ValueError(f"checkpoint {directory}: {CONFIG_FILE} lacks {', '.join(sorted(missing))}")
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory}: format {meta['format']}, this code reads {FORMAT_VERSION}")
    return meta


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes, load its weights and return it in eval mode."""
    meta = read_metadata(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {directory}: no {WEIGHTS_FILE}")
    config_class, model_class = model_classes(meta["kind"])
    config = from_dict(config_class, meta["config"])
    tensors = load_file(str(weights))
    found = fingerprint(config, tensors)
    if found != meta["fingerprint"]:
        raise ValueError(f"checkpoint {directory}: weights fingerprint {found} != recorded {meta['fingerprint']}")
    model = model_class(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()


def local_export(location: str | Path, cache: str | Path | None = None) -> Path:
    """A local folder holding the export at `location`: the folder itself, or an object-store export copied into
    `cache` (default `EXPORT_CACHE`), keyed by location. A copy is reused while its config equals the store's (the
    config records the weights' fingerprint, which `load_checkpoint` checks). A fetch downloads into a folder of its
    own, then moves each file into place (an atomic rename), config last: processes that fetch one export at once (the
    actors of a node) never read a file another is writing, and a fetch cut short is made again."""
    location = str(location)
    if not is_uri(location):
        return Path(location)
    fs, root = resolve_filesystem(location)
    try:
        with fs.open_input_stream(posixpath.join(root, CONFIG_FILE)) as f:
            config = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {redact(location)}: no {CONFIG_FILE}") from None
    target = Path(cache or EXPORT_CACHE) / redact(location).replace("://", "/").replace("@", "_")
    cached = target / CONFIG_FILE
    if cached.is_file() and cached.read_bytes() == config:
        return target
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        names = []
        for info in fs.get_file_info(pa_fs.FileSelector(root)):
            name = posixpath.basename(info.path)
            if info.type == pa_fs.FileType.File and name != CONFIG_FILE:
                with fs.open_input_stream(info.path) as src:
                    (staging / name).write_bytes(src.read())
                names.append(name)
        (staging / CONFIG_FILE).write_bytes(config)
        for name in [*names, CONFIG_FILE]:
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
