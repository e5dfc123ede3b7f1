"""`videopoet train video-tokenizer` and `videopoet train audio-tokenizer`: tokenizer training on the training engine.

Clips stream from a manifest through the media module in a Ray Data pipeline (decode actors, failures dropped and
counted), are materialized once in the object store, and every worker takes its own deterministic slice by clip id.
The engine (`train.engine`) runs the workers with data parallelism; batch indices are a function of (seed, step, rank),
so a resumed run trains on exactly the batches an uninterrupted one would. Rank 0 logs losses, codebook usage and
held-out quality (PSNR, SSIM and edge sharpness for video; SI-SNR and mel distance for audio) to MLflow, with
reconstruction samples as artifacts. The final weights are exported to OUT/tokenizer (safetensors + config JSON) for
the tokenize job.

The paper's recipe, all of it training settings of this app (none of it in the export):
- `[discriminator] enabled`: a GAN discriminator with its own DeepSpeed engine and optimizer, trained from
  `start_step` on; MAGVIT-v2's 3D patch discriminator with hinge loss and LeCam regularization (fixed or adaptive
  adversarial weight), SoundStream's STFT discriminator with hinge and feature-matching losses;
- `[perceptual]` (video): an LPIPS-style distance through a VGG16 loaded from a local file (`perceptual.path`);
- image-then-video (video): `mode = "image"` trains the same model on single frames drawn from the clips, and
  `--init-image EXPORT` starts a video tokenizer from that image tokenizer, inflated (`pipeline.magvit`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.adversarial import (PerceptualLoss, STFTDiscriminator, STFTDiscriminatorConfig, VideoDiscriminator,
                                  VideoDiscriminatorConfig, load_perceptual_network)
from pipeline.checkpoint import load_checkpoint, local_export, read_metadata, save_checkpoint
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.lineage import export_record, manifest_record
from pipeline.magvit import MagvitConfig, MagvitModel, inflate_from_image, tensor_to_video, video_to_tensor
from pipeline.manifest import ManifestError, read_manifest
from pipeline.media import MediaConfig
from pipeline.metrics import codebook_usage, psnr, sharpness, si_snr, ssim
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.tracking import TrackingConfig
from pipeline.storage import Busy
from train.cli import app_config
from train.engine import (DeepSpeedConfig, Objective, Recipe, TrainConfig, Worker, final_weights, fit, result_metrics)
from train.runs import RunFolder, log_export, open_run, write_run_config, write_summary


def _data_parallel() -> DeepSpeedConfig:
    # Tokenizers have tens of millions of parameters at most: plain data parallelism, no partitioning.
    return DeepSpeedConfig(zero_stage=0)


# ---------------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class PerceptualConfig:
    weight: float = 0.0  # of the perceptual distance in the generator's loss
    path: str = ""  # a local VGG16 `features` .safetensors or a TorchScript feature network; nothing is downloaded

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"perceptual.weight must be >= 0, got {self.weight!r}")
        if bool(self.weight) != bool(self.path):
            raise ValueError("perceptual.weight and perceptual.path go together: set both to use the perceptual "
                             f"loss, neither to leave it off (got weight {self.weight!r}, path {self.path!r})")


def _check_adversarial(cfg: Any) -> None:
    if cfg.discriminator.enabled and cfg.deepspeed.zero_stage == 3:
        raise ValueError("discriminator.enabled needs deepspeed.zero_stage <= 2: the generator's step runs the "
                         "discriminator's forward outside its engine, which ZeRO-3's partitioned parameters forbid")


@dataclass(frozen=True)
class VideoTokenizerTrainConfig:
    model: MagvitConfig = field(default_factory=MagvitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=_data_parallel)
    media: MediaConfig = field(default_factory=MediaConfig)
    discriminator: VideoDiscriminatorConfig = field(default_factory=VideoDiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_clips: int = 16  # held out when the manifest has no split column
    samples: int = 4  # reconstructions logged as artifacts
    # Mirror each training clip left-right and play it backwards, each with probability 1/2: four views of every
    # clip. On a small corpus the tokenizer otherwise learns its clips' object positions and paths, and renders
    # objects on paths it never saw less faithfully.
    augment: bool = False
    # "image": train on single frames drawn from the clips (the paper's image tokenizer, to inflate into a video one)
    mode: Literal["video", "image"] = "video"
    init_image: str = ""  # an image tokenizer export (mode = "image") to inflate as the starting point

    def __post_init__(self):
        _check_adversarial(self)
        if self.init_image and self.mode == "image":
            raise ValueError("init_image inflates an image tokenizer into a video one: it needs mode = 'video'")
        if self.val_clips < 1 or self.samples < 0:
            raise ValueError(f"val_clips must be >= 1 and samples >= 0, got {self.val_clips!r} and {self.samples!r}")


@dataclass(frozen=True)
class AudioTokenizerTrainConfig:
    model: SoundStreamConfig = field(default_factory=SoundStreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=_data_parallel)
    media: MediaConfig = field(default_factory=MediaConfig)
    discriminator: STFTDiscriminatorConfig = field(default_factory=STFTDiscriminatorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    val_clips: int = 16
    samples: int = 4
    # Train on random crops of this many latent frames (0: whole clips). The networks are convolutional, so short
    # crops buy more optimizer steps for the same compute; on the synthetic world 0.4 s crops reach in 4 minutes the
    # SI-SNR that whole 2.125 s clips do not reach in 10.
    crop_frames: int = 0

    def __post_init__(self):
        _check_adversarial(self)
        if self.crop_frames < 0:
            raise ValueError(f"crop_frames must be >= 0 (0: whole clips), got {self.crop_frames}")
        if self.val_clips < 1 or self.samples < 0:
            raise ValueError(f"val_clips must be >= 1 and samples >= 0, got {self.val_clips!r} and {self.samples!r}")


# ---------------------------------------------------------------------------------------------------- modalities

class VideoModality:
    """What video training needs to know about its data and its quality metrics."""

    name = "video"
    config_class = VideoTokenizerTrainConfig
    kinds = {"": "train_video_tokenizer", "model": "video_tokenizer"}

    @staticmethod
    def build(cfg: Any) -> torch.nn.Module:
        return MagvitModel(cfg)

    @staticmethod
    def keep(batch: dict[str, np.ndarray]) -> np.ndarray:
        return batch["ok"]

    @staticmethod
    def column(batch: dict[str, np.ndarray]) -> np.ndarray:
        return batch["frames"]

    @staticmethod
    def inputs(data: np.ndarray) -> torch.Tensor:
        return video_to_tensor(data)

    @staticmethod
    def batch(data: np.ndarray, index: np.ndarray, app: Any, rng: np.random.Generator) -> torch.Tensor:
        clips = data[index]
        if app.mode == "image":
            clips = clips[np.arange(len(index)), rng.integers(clips.shape[1], size=len(index))][:, None]
        if app.augment:
            mirror, reverse = rng.random((2, len(index))) < 0.5
            clips[mirror] = clips[mirror][:, :, :, ::-1]
            clips[reverse] = clips[reverse][:, ::-1]
        return video_to_tensor(clips)

    @staticmethod
    @torch.no_grad()
    def evaluate(model: MagvitModel, data: np.ndarray, device: torch.device) -> tuple[dict[str, float], np.ndarray]:
        codes, recon = [], []
        for i in range(0, len(data), 8):
            c = model.encode(video_to_tensor(data[i:i + 8]).to(device))
            codes.append(c.cpu().numpy())
            recon.append(tensor_to_video(model.decode(c)).cpu().numpy())
        recon = np.concatenate(recon)
        usage = codebook_usage(np.concatenate(codes), model.codebook_size)
        metrics = {"val_psnr": psnr(data, recon), "val_ssim": ssim(data, recon),
                   "val_sharpness": sharpness(data, recon), "codebook_used": usage["used_fraction"],
                   "codebook_perplexity": usage["perplexity"]}
        return metrics, recon

    @staticmethod
    def held_out(data: np.ndarray, app: Any) -> np.ndarray:
        """The validation inputs: the held-out clips, or their first frames for an image tokenizer."""
        return data[:, :1] if app.mode == "image" else data

    @staticmethod
    def critic(app: Any) -> VideoDiscriminator:
        return VideoDiscriminator(app.discriminator)

    @staticmethod
    def adversarial_loss(critic: VideoDiscriminator, app: Any, model: MagvitModel, x: torch.Tensor,
                         reconstruction: torch.Tensor, loss: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's weighted adversarial loss: fixed `weight`, or times the adaptive balance against `loss`."""
        gan = critic.generator_loss(reconstruction)
        weight = torch.tensor(app.discriminator.weight, device=gan.device)
        if app.discriminator.adaptive_weight:
            weight = weight * balance(loss, gan, VideoModality.last_layer(model))
        return weight * gan, {"gen_adversarial": gan.detach(), "adversarial_weight": weight.detach()}

    @staticmethod
    def last_layer(model: MagvitModel) -> torch.Tensor:
        return model.decoder.conv_out.conv.weight

    @staticmethod
    def write_samples(data: np.ndarray, recon: np.ndarray, folder: Path, sample_rate: int) -> None:
        """One PNG per clip: the original frames on top, the reconstruction below."""
        from PIL import Image

        for i, (x, y) in enumerate(zip(data, recon)):
            grid = np.concatenate([np.concatenate(list(x), axis=1), np.concatenate(list(y), axis=1)], axis=0)
            Image.fromarray(grid).save(folder / f"clip{i}.png")


class AudioModality:
    """Audio training: clips with a sound track only; quality is SI-SNR and log-mel distance."""

    name = "audio"
    config_class = AudioTokenizerTrainConfig
    kinds = {"": "train_audio_tokenizer", "model": "audio_tokenizer"}

    @staticmethod
    def build(cfg: Any) -> torch.nn.Module:
        return SoundStreamModel(cfg)

    @staticmethod
    def keep(batch: dict[str, np.ndarray]) -> np.ndarray:
        return batch["ok"] & batch["has_audio"]

    @staticmethod
    def column(batch: dict[str, np.ndarray]) -> np.ndarray:
        return batch["audio"]

    @staticmethod
    def inputs(data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(data, np.float32))

    @staticmethod
    def batch(data: np.ndarray, index: np.ndarray, app: Any, rng: np.random.Generator) -> torch.Tensor:
        """Clips `index`, each cut to a random hop-aligned window of `app.crop_frames` latent frames."""
        hop = math.prod(app.model.strides)
        length = app.crop_frames * hop
        if not length or length >= data.shape[1]:
            return AudioModality.inputs(data[index])
        starts = rng.integers((data.shape[1] - length) // hop + 1, size=len(index)) * hop
        return AudioModality.inputs(data[index[:, None], starts[:, None] + np.arange(length)])

    @staticmethod
    @torch.no_grad()
    def evaluate(model: SoundStreamModel, data: np.ndarray, device: torch.device
                 ) -> tuple[dict[str, float], np.ndarray]:
        codes = model.encode(torch.from_numpy(data).to(device))
        recon = model.decode(codes).float()
        reference = torch.from_numpy(data[:, : recon.shape[-1]]).to(device)
        window = max(model.config.stft_windows)
        mel_distance = (model.mel_spectrogram(recon, window).clamp_min(1e-5).log()
                        - model.mel_spectrogram(reference, window).clamp_min(1e-5).log()).abs().mean()
        codes, reference, recon = codes.cpu(), reference.cpu(), recon.cpu()
        per_level = [codebook_usage(codes[:, level].numpy(), model.codebook_size) for level in range(model.levels)]
        metrics = {"val_si_snr": si_snr(reference.numpy(), recon.numpy()), "val_mel_distance": float(mel_distance),
                   "codebook_used": float(np.mean([u["used_fraction"] for u in per_level])),
                   "codebook_perplexity": float(np.mean([u["perplexity"] for u in per_level]))}
        return metrics, recon.numpy()

    @staticmethod
    def held_out(data: np.ndarray, app: Any) -> np.ndarray:
        return data

    @staticmethod
    def critic(app: Any) -> STFTDiscriminator:
        return STFTDiscriminator(app.discriminator)

    @staticmethod
    def adversarial_loss(critic: STFTDiscriminator, app: Any, model: SoundStreamModel, x: torch.Tensor,
                         reconstruction: torch.Tensor, loss: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge and feature matching, weighted by the discriminator's config (SoundStream's fixed weights)."""
        return critic.generator_loss(x[:, : reconstruction.shape[-1]], reconstruction)

    @staticmethod
    def write_samples(data: np.ndarray, recon: np.ndarray, folder: Path, sample_rate: int) -> None:
        for i, (x, y) in enumerate(zip(data, recon)):
            write_wav(folder / f"clip{i}_original.wav", x, sample_rate)
            write_wav(folder / f"clip{i}_reconstruction.wav", y, sample_rate)


MODALITIES: dict[str, Any] = {"video": VideoModality, "audio": AudioModality}


# ---------------------------------------------------------------------------------------------------- data

def clip_datasets(table: pa.Table, media: MediaConfig, val_clips: int):
    """(train, val, failed sources): Ray datasets of a manifest's decoded clips, held out by its `val` split."""
    import ray

    from pipeline.decode import DecodeClips

    decoded = ray.data.from_arrow(table).map_batches(
        DecodeClips, fn_constructor_args=(media,), batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2)).materialize()
    stats = decoded.select_columns(["ok", "source"]).to_pandas()
    clips = decoded.filter(lambda row: bool(row["ok"]))
    val_ids = (set(table.filter(pc.equal(table["split"], "val"))["id"].to_pylist())
               if "split" in table.column_names else set())
    if val_ids:
        train = clips.filter(lambda row: row["id"] not in val_ids)
        val = clips.filter(lambda row: row["id"] in val_ids)
    else:  # no split given: hold out the last clips by id
        held = set(sorted(clips.unique("clip_id"))[-val_clips:])
        train = clips.filter(lambda row: row["clip_id"] not in held)
        val = clips.filter(lambda row: row["clip_id"] in held)
    failed = stats[~stats["ok"]]["source"].tolist()
    return train.materialize(), val.materialize(), failed


def collect(shard, modality: Any, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """All usable clips of a dataset shard, sorted by clip id, this rank's slice."""
    ids, values = [], []
    for batch in shard.iter_batches(batch_format="numpy", batch_size=64):
        keep = modality.keep(batch)
        ids += list(batch["clip_id"][keep])
        values.append(modality.column(batch)[keep])
    if not ids:
        return np.zeros((0,), np.uint8)
    order = np.argsort(np.array(ids, dtype=object).astype(str))
    return np.concatenate(values)[order][rank::world_size]


# ---------------------------------------------------------------------------------------------------- recipe

def balance(loss: torch.Tensor, adversarial: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight: the ratio of the two losses' gradient norms at the decoder's last layer."""
    own = torch.autograd.grad(loss, layer, retain_graph=True)[0]
    other = torch.autograd.grad(adversarial, layer, retain_graph=True)[0]
    return (own.norm() / (other.norm() + 1e-4)).clamp(0, 1e4).detach()


class GeneratorObjective(torch.nn.Module):
    """The tokenizer's engine module: its own objective, plus the perceptual distance and the adversarial loss when
    configured. The discriminator and the perceptual network are held beside the tokenizer, not registered inside this
    module: they are not this engine's parameters (the discriminator has an engine of its own) and stay out of the
    tokenizer's checkpoint and export."""

    def __init__(self, model: torch.nn.Module, modality: Any, app: Any, critic: torch.nn.Module | None,
                 perceptual: PerceptualLoss | None):
        super().__init__()
        self.model = model
        self.modality = modality
        self.app = app
        self.beside = {"critic": critic, "perceptual": perceptual}

    def forward(self, x: torch.Tensor, adversarial: bool = False):
        """(loss, detached terms, detached reconstruction)."""
        out = self.model(x)
        loss, terms = self.model.objective(x, out)
        perceptual = self.beside["perceptual"]
        if perceptual is not None:
            distance = perceptual(out.reconstruction.float(), x.float())
            loss = loss + self.app.perceptual.weight * distance
            terms["perceptual"] = distance.detach()
        if adversarial:
            gan, gan_terms = self.modality.adversarial_loss(self.beside["critic"], self.app, self.model, x,
                                                            out.reconstruction, loss)
            loss = loss + gan
            terms.update(gan_terms)
        return loss, terms, out.reconstruction.detach()


def initial_model(modality: Any, app: Any) -> torch.nn.Module:
    """A fresh tokenizer, or with `init_image` the image tokenizer of that export inflated into a video one."""
    if not getattr(app, "init_image", ""):
        return modality.build(app.model)
    return inflate_from_image(load_checkpoint(local_export(app.init_image)).train())


def check_init_image(app: Any) -> dict[str, Any]:
    """What the run records of `init_image`; refuses an export that is not an image tokenizer of this architecture."""
    meta = read_metadata(local_export(app.init_image))
    where = f"init_image {app.init_image}"
    if meta["kind"] != "magvit" or meta["extra"].get("mode") != "image":
        raise ValueError(f"{where}: not an image tokenizer (a {meta['kind']} export trained with mode = "
                         f"{meta['extra'].get('mode', 'video')!r}; train one with --set mode=image)")
    if from_dict(MagvitConfig, meta["config"]) != app.model:
        raise ValueError(f"{where}: its model config differs from this run's `model` section; an inflated "
                         "tokenizer keeps the image tokenizer's architecture")
    return {"init_image": app.init_image, "init_image_fingerprint": meta["fingerprint"]}


class TokenizerRecipe(Recipe):
    """Each draw takes `batch_size` of this rank's clips (a view or crop of each) and trains the tokenizer, then the
    discriminator when it is on; validation reconstructs the held-out clips on every rank and rank 0 logs them."""

    def __init__(self, worker: Worker):
        super().__init__(worker)
        self.modality = MODALITIES[worker.config["modality"]]
        self.app = from_dict(self.modality.config_class, worker.config["app"])
        self.data = collect(worker.dataset("train"), self.modality, worker.rank, worker.world_size)
        if len(self.data) == 0:
            raise RuntimeError(f"rank {worker.rank}: no training clips (manifest {worker.config['manifest']})")
        val = collect(worker.dataset("val"), self.modality)[: max(1, self.app.val_clips)]
        self.val = self.modality.held_out(val, self.app) if len(val) else val
        self.recon: np.ndarray | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        model = initial_model(self.modality, self.app)
        critic = self.modality.critic(self.app) if self.app.discriminator.enabled else None
        path = getattr(self.app, "perceptual", PerceptualConfig()).path
        perceptual = PerceptualLoss(path).to(self.worker.device) if path else None
        modules = {"model": GeneratorObjective(model, self.modality, self.app, critic, perceptual)}
        if critic is not None:
            modules["discriminator"] = Objective(critic, "discriminator_loss")
        return modules

    def train_step(self, engines, draw: int) -> dict[str, float]:
        rng = np.random.default_rng([self.worker.train.seed, draw, self.worker.rank])
        index = rng.integers(len(self.data), size=self.worker.train.batch_size)
        x = self.modality.batch(self.data, index, self.app, rng).to(self.worker.device, self.worker.dtype)
        adversarial = "discriminator" in engines and draw >= self.app.discriminator.start_step
        generator = engines["model"]
        critic = engines.get("discriminator")
        if critic is not None:
            critic.module.requires_grad_(False)  # the generator's loss reaches the discriminator: keep its grads out
        loss, terms, reconstruction = generator(x, adversarial=adversarial)
        generator.backward(loss)
        generator.step()
        sums = {"loss": loss.item(), **{k: v.item() for k, v in terms.items()}, "batches": 1.0}
        grad_norm = generator.get_global_grad_norm()
        if grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        if critic is not None:
            critic.module.requires_grad_(True)
            if adversarial:
                critic_loss, critic_terms = critic(x, reconstruction)
                critic.backward(critic_loss)
                critic.step()
                sums.update(disc_loss=critic_loss.item(), **{k: v.item() for k, v in critic_terms.items()})
        return sums

    def metrics(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        batches = sums.pop("batches")
        clips = batches * self.worker.train.batch_size * self.worker.world_size
        return {**{k: v / batches for k, v in sums.items()}, "clips_per_s": clips / seconds}

    def validate(self, engines) -> dict[str, float]:
        if not len(self.val):
            return {}
        model = engines["model"].module.model
        quality, self.recon = self.modality.evaluate(model, self.val, self.worker.device)
        return quality

    def finish(self, engines) -> None:
        if self.worker.rank == 0 and self.recon is not None:
            import tempfile

            samples = self.app.samples
            with tempfile.TemporaryDirectory() as tmp:
                self.modality.write_samples(self.val[:samples], self.recon[:samples], Path(tmp),
                                            self.app.media.sample_rate)
                self.worker.tracker.log_artifact(tmp, "samples")


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


# ---------------------------------------------------------------------------------------------------- driver

def train_tokenizer(modality_name: str, app: Any, manifest: str, out: str | Path, parent=None) -> dict[str, Any]:
    """Train (or resume) a tokenizer; returns the summary also written to OUT/summary.json."""
    modality = MODALITIES[modality_name]
    name = f"{modality_name}_tokenizer"
    # Files the workers will load are checked here, so a wrong path fails before any work with its name.
    origin = check_init_image(app) if getattr(app, "init_image", "") else {}
    if getattr(app, "perceptual", PerceptualConfig()).path:
        load_perceptual_network(app.perceptual.path)
    table = read_manifest(manifest)  # and the manifest read: a bad one leaves no run folder or MLflow run behind
    folder = RunFolder(out)
    with folder.hold(name):
        write_run_config(folder, to_dict(app))
        run = open_run(app, folder, name, parent)
        began = time.perf_counter()
        with run:
            train_ds, val_ds, failed = clip_datasets(table, app.media, app.val_clips)
            run.log_metrics({"train_clips": train_ds.count(), "val_clips": val_ds.count(),
                             "failed_inputs": len(failed)})
            run.log_dataset(manifest_record(manifest, table), "train")
            if origin:
                run.set_tags(origin)
                run.log_dataset(export_record(local_export(app.init_image)), "init")
            result = fit(name, TokenizerRecipe, app, folder.location, run, {"train": train_ds, "val": val_ds},
                         modality=modality_name, manifest=str(manifest))
            weights, step = final_weights(result)
            model = modality.build(app.model)
            model.load_state_dict(weights)
            extra = {"steps": step, "manifest": str(manifest), "mode": getattr(app, "mode", "video"), **origin}
            with folder.export_dir("tokenizer") as export:
                save_checkpoint(export, model, app.model, extra=extra)
                fingerprint = log_export(run, export, "tokenizer")
            summary = {"modality": modality_name, "steps": step, "fingerprint": fingerprint,
                       "tokenizer": folder.uri("tokenizer"), "failed_inputs": failed, "metrics": result_metrics(result),
                       "seconds": time.perf_counter() - began}
            write_summary(folder, run, summary)
        return summary


def run(args: argparse.Namespace) -> int:
    """`videopoet train video-tokenizer` or `audio-tokenizer` with its arguments parsed (`train.cli`)."""
    modality_name = args.modality
    modality = MODALITIES[modality_name]
    if getattr(args, "init_image", None):
        args.overrides.append(f"init_image={json.dumps(args.init_image)}")
    try:
        app = app_config(modality.config_class, args, modality.kinds)
        summary = train_tokenizer(modality_name, app, args.manifest, args.out)
    except (ConfigError, Busy, ValueError, ManifestError, FileNotFoundError) as e:
        print(f"videopoet train {modality_name}-tokenizer: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "failed_inputs"}, indent=2))
    return 0
