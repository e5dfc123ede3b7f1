"""The tokenizer apps' training recipe: the adversarial and perceptual terms, the image-then-video recipe, and the
settings that go with them. The end-to-end runs (Ray Train, DeepSpeed, MLflow) are in test_train_tokenizers.py."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.adversarial import PerceptualLoss, STFTDiscriminator, VideoDiscriminator, vgg16_features
from pipeline.checkpoint import save_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.magvit import MagvitModel, video_to_tensor
from pipeline.soundstream import SoundStreamModel
from train.tokenizers import (AudioModality, AudioTokenizerTrainConfig, GeneratorObjective, VideoModality,
                              VideoTokenizerTrainConfig, balance, check_init_image, initial_model)


def video_app(*overrides):
    return load_config(VideoTokenizerTrainConfig, "debug", list(overrides), kind=VideoModality.kinds)


def audio_app(*overrides):
    return load_config(AudioTokenizerTrainConfig, "debug", list(overrides), kind=AudioModality.kinds)


def test_flavors_keep_the_paper_recipe_in_the_paper_flavor_only():
    for flavor in ("debug", "demo"):
        assert not load_config(VideoTokenizerTrainConfig, flavor, kind=VideoModality.kinds).discriminator.enabled
        assert not load_config(AudioTokenizerTrainConfig, flavor, kind=AudioModality.kinds).discriminator.enabled
    paper = load_config(VideoTokenizerTrainConfig, "paper", kind=VideoModality.kinds)
    assert paper.discriminator.enabled and paper.discriminator.adaptive_weight and paper.discriminator.start_step > 0
    assert load_config(AudioTokenizerTrainConfig, "paper", kind=AudioModality.kinds).discriminator.enabled


@pytest.mark.parametrize("override, message", [
    ("perceptual.weight=0.1", "perceptual.weight and perceptual.path go together"),
    ("perceptual.path='vgg.safetensors'", "perceptual.weight and perceptual.path go together"),
    ("init_image='x'", "init_image inflates an image tokenizer into a video one"),
    ("discriminator.lecam_decay=1.0", "lecam_decay must lie in"),
    ("discriminator.start_step=-1", "start_step >= 0"),
])
def test_bad_video_settings_are_refused(override, message):
    extra = ["mode='image'"] if override.startswith("init_image") else []
    with pytest.raises(ConfigError, match=message):
        video_app(override, *extra)


def test_a_discriminator_needs_unpartitioned_parameters():
    with pytest.raises(ConfigError, match="zero_stage <= 2"):
        audio_app("discriminator.enabled=true", "deepspeed.zero_stage=3")


def clips(n=2, frames=5, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, frames, size, size, 3), dtype=np.uint8)


def test_generator_loss_adds_the_adversarial_term_and_leaves_the_discriminator_alone():
    app = video_app("discriminator.enabled=true", "discriminator.channels=4", "discriminator.channel_mults=[1]",
                    "discriminator.weight=0.5")
    torch.manual_seed(0)
    model, critic = MagvitModel(app.model), VideoDiscriminator(app.discriminator)
    objective = GeneratorObjective(model, VideoModality, app, critic, None)
    assert set(objective.state_dict()) == {f"model.{k}" for k in model.state_dict()}  # nothing of the critic
    x = video_to_tensor(clips())
    plain, _, _ = objective(x, adversarial=False)
    critic.requires_grad_(False)
    loss, terms, reconstruction = objective(x, adversarial=True)
    loss.backward()
    assert all(p.grad is None for p in critic.parameters())
    assert loss.item() == pytest.approx(plain.item() + 0.5 * terms["gen_adversarial"].item(), rel=1e-5)
    assert terms["adversarial_weight"].item() == pytest.approx(0.5)
    assert not reconstruction.requires_grad and reconstruction.shape == x.shape


def test_adaptive_weight_balances_the_gradient_norms():
    layer = torch.nn.Parameter(torch.randn(3, 4))
    own = (layer * 3).sum()
    other = (layer * 0.5).pow(2).sum()
    weight = balance(own, other, layer)
    g_own = torch.full((3, 4), 3.0)
    g_other = 2 * 0.25 * layer.detach()
    assert weight.item() == pytest.approx((g_own.norm() / (g_other.norm() + 1e-4)).item(), rel=1e-5)
    adaptive = video_app("discriminator.enabled=true", "discriminator.adaptive_weight=true",
                         "discriminator.channels=4", "discriminator.channel_mults=[1]")
    model = MagvitModel(adaptive.model)
    objective = GeneratorObjective(model, VideoModality, adaptive, VideoDiscriminator(adaptive.discriminator), None)
    _, terms, _ = objective(video_to_tensor(clips()), adversarial=True)
    assert terms["adversarial_weight"].item() > 0


def test_audio_generator_gets_hinge_and_feature_matching():
    app = audio_app("discriminator.enabled=true", "discriminator.window=64", "discriminator.hop=16",
                    "discriminator.channels=4", "discriminator.strides=[2, 2]")
    model, critic = SoundStreamModel(app.model), STFTDiscriminator(app.discriminator)
    objective = GeneratorObjective(model, AudioModality, app, critic, None)
    x = torch.randn(2, 3200)
    _, terms, reconstruction = objective(x, adversarial=True)
    assert {"gen_adversarial", "gen_feature_matching"} <= set(terms)
    loss, critic_terms = critic.discriminator_loss(x[:, : reconstruction.shape[-1]], reconstruction)
    assert loss.item() >= 0 and "disc_hinge" in critic_terms


def test_perceptual_term_from_a_local_vgg_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, str(path))
    app = video_app("perceptual.weight=0.25", f"perceptual.path='{path}'")
    model = MagvitModel(app.model)
    perceptual = PerceptualLoss(path)
    objective = GeneratorObjective(model, VideoModality, app, None, perceptual)
    x = video_to_tensor(clips(frames=1, size=32))
    loss, terms, _ = objective(x)
    own, _ = model.objective(x, model(x))
    assert terms["perceptual"].item() > 0
    assert loss.item() == pytest.approx(own.item() + 0.25 * terms["perceptual"].item(), rel=1e-5)
    assert all(not k.startswith("perceptual") for k in objective.state_dict())
    bad = tmp_path / "bad.safetensors"
    save_file({"weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a VGG16 features state dict"):
        PerceptualLoss(bad)


def test_image_mode_draws_single_frames_of_the_clips():
    app = video_app("mode='image'")
    data = clips(n=3, frames=5)
    x = VideoModality.batch(data, np.array([2, 0, 2, 1]), app, np.random.default_rng(0))
    assert tuple(x.shape) == (4, 3, 1, 16, 16)
    for row, clip in zip(x, [2, 0, 2, 1]):
        assert any(torch.equal(row, video_to_tensor(data[clip][t:t + 1][None])[0]) for t in range(5))
    assert VideoModality.held_out(data, app).shape == (3, 1, 16, 16, 3)


def test_init_image_inflates_an_image_export(tmp_path):
    image_app = video_app("mode='image'")
    torch.manual_seed(4)
    image_model = MagvitModel(image_app.model)
    save_checkpoint(tmp_path / "image", image_model, image_app.model, extra={"mode": "image"})
    app = video_app(f"init_image='{tmp_path / 'image'}'")
    assert check_init_image(app)["init_image_fingerprint"] == image_model.fingerprint()
    video_model = initial_model(VideoModality, app)
    images = video_to_tensor(clips(n=3, frames=1, seed=5))
    assert torch.equal(video_model.encode(images), image_model.eval().encode(images))  # tokenizes images alike

    save_checkpoint(tmp_path / "video", image_model, image_app.model, extra={"mode": "video"})
    with pytest.raises(ValueError, match="not an image tokenizer"):
        check_init_image(replace(app, init_image=str(tmp_path / "video")))
    wider = video_app(f"init_image='{tmp_path / 'image'}'", "model.base_channels=16")
    with pytest.raises(ValueError, match="model config differs"):
        check_init_image(wider)
