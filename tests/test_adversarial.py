import pytest
import torch
from safetensors.torch import save_file

from pipeline.adversarial import (PerceptualLoss, STFTDiscriminator, STFTDiscriminatorConfig, VideoDiscriminator,
                                  VideoDiscriminatorConfig, vgg16_features)


def test_video_discriminator_and_lecam():
    torch.manual_seed(0)
    cfg = VideoDiscriminatorConfig(enabled=True, channels=4, channel_mults=(2, 2), lecam_weight=0.5, lecam_decay=0.5)
    disc = VideoDiscriminator(cfg)
    real, fake = torch.rand(2, 3, 5, 16, 16) * 2 - 1, (torch.rand(2, 3, 5, 16, 16) * 2 - 1).requires_grad_()
    assert disc(real).shape == (2, 1, 2, 4, 4)
    total, terms = disc.discriminator_loss(real, fake)
    real_logits, fake_logits = disc(real).detach(), disc(fake).detach()
    hinge = torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()
    lecam = real_logits.clamp_min(0).pow(2).mean() + (-fake_logits).clamp_min(0).pow(2).mean()  # EMAs start at 0
    assert torch.allclose(terms["disc_hinge"], hinge, atol=1e-6) and torch.allclose(terms["disc_lecam"], lecam)
    assert torch.allclose(disc.ema_real, 0.5 * real_logits.mean()) and torch.allclose(disc.ema_fake,
                                                                                      0.5 * fake_logits.mean())
    total.backward()
    assert fake.grad is None  # the discriminator loss does not reach the generator
    (grad,) = torch.autograd.grad(disc.generator_loss(fake), fake)
    assert grad.abs().sum() > 0


def test_stft_discriminator_losses():
    torch.manual_seed(0)
    disc = STFTDiscriminator(STFTDiscriminatorConfig(enabled=True, channels=4, window=256, hop=64, strides=(2, 2)))
    real, fake = torch.randn(2, 3200) * 0.3, (torch.randn(2, 3200) * 0.3).requires_grad_()
    logits, features = disc(real)
    assert logits.ndim == 4 and len(features) == 3
    d_loss, _ = disc.discriminator_loss(real, fake)
    assert d_loss > 0
    g_loss, terms = disc.generator_loss(real, fake)
    (grad,) = torch.autograd.grad(g_loss, fake)
    assert grad.abs().sum() > 0 and terms["gen_feature_matching"] > 0
    _, same = disc.generator_loss(real, real)
    assert float(same["gen_feature_matching"]) == 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_perceptual_loss_from_torchscript(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    loss = PerceptualLoss(path)
    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    assert float(loss(x, x)) == 0.0
    value = loss(x, y)
    assert value > 0
    value.backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.net.training


def test_perceptual_loss_from_vgg_state_dict(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, str(path))
    loss = PerceptualLoss(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0 and float(loss(x, x.flip(-1))) > 0


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_perceptual_loss_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerceptualLoss(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        PerceptualLoss(tmp_path / "junk.pt")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="VGG16"):
        PerceptualLoss(tmp_path / "other.safetensors")
