"""The training engine: DeepSpeed config, validation of the train settings, and a tiny recipe under Ray Train with
ZeRO-3 on 2 CPU workers: exact resume from sharded checkpoints, buffers kept in step with rank 0, the fp32 export."""

import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from train.engine import DeepSpeedConfig, Recipe, TrainConfig, deepspeed_config, lr_at


def test_deepspeed_config():
    train = TrainConfig(batch_size=3, lr=1e-3, grad_clip=0.5)
    cfg = deepspeed_config(train, DeepSpeedConfig(zero_stage=2, offload_optimizer=True, gradient_accumulation_steps=4))
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert cfg["optimizer"]["params"]["torch_adam"] is False and cfg["bf16"]["enabled"] is False
    gpu = deepspeed_config(TrainConfig(use_gpu=True), DeepSpeedConfig())
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["fused"] is True
    with pytest.raises(ValueError, match="offload_params needs"):
        DeepSpeedConfig(zero_stage=2, offload_params=True)


@pytest.mark.parametrize("override, message", [
    ("train.steps=-1", "train.steps must be >= 1"), ("train.lr=0", "train.lr must be a finite number > 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.min_lr_ratio=2", r"train.min_lr_ratio must lie in \[0, 1\]"),
    ("train.betas=[0.9, 1.0]", r"train.betas must lie in \[0, 1\)"),
    ("deepspeed.gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1"),
    ("train.min_workers=3", r"train.min_workers \(3\) must be <= train.workers \(2\)"),
])
def test_bad_settings_are_refused_at_load(override, message):
    from train.llm import LLMTrainConfig

    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(LLMTrainConfig, "debug", [override], kind={"": "train_llm", "model": "llm"})


def test_learning_rate_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


class Counted(torch.nn.Module):
    """A regression net with a buffer that only rank 0's forward passes would leave as the step count."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.register_buffer("seen", torch.zeros(()))

    def loss(self, x):
        self.seen += 1 + torch.rand(())  # differs per rank: the engine must hand rank 0's value around
        loss = (self.net(x) - x.sum(-1, keepdim=True)).pow(2).mean()
        return loss, {"loss": loss.detach()}


class TinyRecipe(Recipe):
    def modules(self):
        from train.engine import Objective

        return {"model": Objective(Counted())}

    def train_step(self, engines, draw):
        x = torch.randn(self.worker.train.batch_size, 8,
                        generator=torch.Generator().manual_seed(1000 * draw + self.worker.rank))
        engine = engines["model"]
        loss, _ = engine(x)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item(), "batches": 1.0}

    def metrics(self, sums, seconds):
        return {"loss": sums["loss"] / sums["batches"]}


def test_a_run_folder_is_held_by_one_run(tmp_path):
    from pipeline.storage import Busy
    from train.runs import RunFolder

    with RunFolder(tmp_path / "run").hold("llm"):
        with pytest.raises(Busy, match="--out .*run is in use by .*llm"):
            with RunFolder(tmp_path / "run").hold("llm"):
                pass
    with RunFolder(tmp_path / "run").hold("llm"):  # released when the holder ends
        pass


def test_run_folders_on_an_object_store(s3, tmp_path):
    from pipeline.tracking import TrackingConfig
    from pipeline.checkpoint import local_export
    from train.runs import RunFolder, open_run

    folder = RunFolder("s3://bucket/runs/llm")
    with folder.hold("llm"):
        assert folder.read_text("words.json") is None
        folder.write_text("words.json", "{}")
        assert folder.read_text("words.json") == "{}" and folder.uri("model") == "s3://bucket/runs/llm/model"
        with folder.export_dir("model") as export:
            (export / "model.safetensors").write_bytes(b"weights")
            (export / "config.json").write_text("{}")
        copy = local_export("s3://bucket/runs/llm/model", tmp_path / "cache")
        assert (copy / "model.safetensors").read_bytes() == b"weights"

        class App:
            tracking = TrackingConfig()

        with pytest.raises(ValueError, match="object-store URI, so the embedded MLflow store has no local folder"):
            open_run(App, folder, "llm", None)


class SameDataRecipe(TinyRecipe):
    """Every rank trains on the same batch, so any number of workers takes the same optimizer steps: a run resumed at
    another worker count must then end where an uninterrupted one does, optimizer state included."""

    def train_step(self, engines, draw):
        x = torch.randn(self.worker.train.batch_size, 8, generator=torch.Generator().manual_seed(1000 * draw))
        engine = engines["model"]
        loss, _ = engine(x)
        engine.backward(loss)
        engine.step()
        return {"loss": loss.item(), "batches": 1.0}


@pytest.mark.heavy
def test_zero3_resumes_at_another_worker_count(tmp_path, ray_local):
    """Two workers for 2 steps, one for the next 2 (a node lost), then an elastic group of 1 to 3 workers
    (`train.min_workers`) on the 2 CPUs, which starts with what fits (a node added): the same weights as 6 steps on
    one worker, so Adam's moments and the step count came through both reshards, and the export holds the full
    (gathered, not ZeRO-3-partitioned) weights. The apps' tests check exact resumes at a fixed worker count with
    each rank on its own data."""
    from ray import cloudpickle

    from pipeline.tracking import NullRun
    from train.engine import STATE_FILE, final_weights, fit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def run(name, steps, workers, min_workers=0):
        class App:
            # A constant rate after warmup: the cosine schedule depends on `steps`, which each leg of the chain sets
            train = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0,
                                checkpoint_every=2, workers=workers, min_workers=min_workers, progress=False,
                                system_metrics_s=0)
            deepspeed = DeepSpeedConfig(zero_stage=3)

        return fit(name, SameDataRecipe, App, str(tmp_path), NullRun(), {})

    straight, _ = final_weights(run("straight", 6, 1))
    for steps, workers, min_workers in ((2, 2, 0), (4, 1, 0), (6, 3, 1)):
        result = run("resized", steps, workers, min_workers)
        resized, step = final_weights(result)
        assert step == steps
    with result.checkpoint.as_directory() as folder:  # a fixed group of 3 would wait for a third CPU forever
        assert json.loads(Path(folder, STATE_FILE).read_text())["world_size"] in (1, 2)
    assert straight.keys() == resized.keys() == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "seen"}
    assert resized["net.0.weight"].shape == (32, 8) and resized["net.0.weight"].dtype == torch.float32
    for key in straight.keys() - {"seen"}:  # `seen` draws from each rank's own generator: no fixed value to meet
        torch.testing.assert_close(straight[key], resized[key], rtol=0, atol=1e-5)
