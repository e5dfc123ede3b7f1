"""DeepSpeed ZeRO under Ray Train on CPU: config, exact resume from sharded checkpoints, consolidated export."""

import pytest
import torch

from train.engine import DeepSpeedConfig, deepspeed_config
from train.runner import TrainConfig


def test_deepspeed_config():
    train = TrainConfig(batch_size=3, lr=1e-3, grad_clip=0.5)
    cfg = deepspeed_config(train, DeepSpeedConfig(zero_stage=2, offload_optimizer=True, gradient_accumulation_steps=4))
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert cfg["optimizer"]["params"]["torch_adam"] is False and cfg["bf16"]["enabled"] is False
    assert deepspeed_config(TrainConfig(use_gpu=True), DeepSpeedConfig())["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="offload_params needs"):
        deepspeed_config(train, DeepSpeedConfig(zero_stage=2, offload_params=True))


def tiny_loop(config):
    import ray.train

    from train import engine as ds
    from train.runner import TrainConfig, world

    train = TrainConfig(**config["train"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    engine = ds.build_engine(model, train, DeepSpeedConfig(zero_stage=config["stage"]))
    state = ds.restore(engine)
    rank, _ = world()
    for step in range(state["step"] if state else 0, train.steps):
        ds.set_lr(engine, step, train)
        x = torch.randn(train.batch_size, 8, generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = (engine(x) - x.sum(-1, keepdim=True)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        if (step + 1) % train.checkpoint_every == 0 or step + 1 == train.steps:
            ds.save(engine, step + 1, {"loss": loss.item()}, {})


@pytest.mark.heavy
@pytest.mark.parametrize("stage", [3])
def test_zero_resume_is_exact(tmp_path, ray_local, stage):
    from train.engine import consolidated_state_dict
    from train.runner import fit

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules

    def run(name, steps):
        train = dict(steps=steps, batch_size=4, lr=1e-2, warmup_steps=10, checkpoint_every=2, workers=2)
        result = fit(name, tiny_loop, {"train": train, "stage": stage}, TrainConfig(**train), tmp_path)
        with result.checkpoint.as_directory() as folder:
            return consolidated_state_dict(folder)

    straight = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4)
    assert straight.keys() == resumed.keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=1e-6)
