"""I3D with random weights (no Kinetics weights can be downloaded here), at the smallest input the architecture
takes: 9 frames of 193x193 (one forward pass is about a second on CPU; 16x224 takes three)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.i3d import (MIN_FRAMES, MIN_SIZE, I3DConfig, I3DFeatureExtractor, InceptionI3d, is_torchscript,
                      load_i3d, load_state_dict_i3d)

SMALL = I3DConfig(num_frames=MIN_FRAMES, size=MIN_SIZE)


def random_i3d(seed: int = 0) -> InceptionI3d:
    """Random weights and BatchNorm statistics, so a misplaced tensor changes the features."""
    torch.manual_seed(seed)
    network = InceptionI3d()
    for module in network.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return network.eval()


class StyleGANVDetector(nn.Module):
    """The call signature of StyleGAN-V's i3d_torchscript.pt around a traced I3D."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.traced = traced

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> Tensor:
        if rescale or resize:
            raise RuntimeError("this detector takes inputs already resized and in [-1, 1]")
        logits = self.traced(x).mean(dim=2)
        return logits if return_features else F.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def network() -> InceptionI3d:
    return random_i3d()


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory, network) -> str:
    """Saved like pytorch-i3d's rgb_imagenet.pt: legacy (non-zip) format, no BatchNorm step counters."""
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("i3d") / "rgb_imagenet.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return str(path)


@pytest.fixture(scope="module")
def videos() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, 12, 40, 56, 3), dtype=np.uint8)


def test_key_names_and_input_check(network):
    keys = network.state_dict().keys()
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Mixed_3b.b0.conv3d.weight",
                "Mixed_5c.b3b.bn.bias", "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in keys
    assert network.state_dict()["Mixed_5c.b1b.conv3d.weight"].shape == (384, 192, 3, 3, 3)
    with pytest.raises(ValueError, match="at least 9 frames of at least 193x193"):
        network(torch.zeros(1, 3, 8, 224, 224))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
def test_round_trip_through_both_weight_files(tmp_path, network, state_dict_file, videos):
    assert not is_torchscript(state_dict_file)
    from_state_dict = I3DFeatureExtractor(replace(SMALL, weights=state_dict_file, batch_size=1))
    clips = from_state_dict.preprocess(videos)
    assert clips.shape == (2, 3, MIN_FRAMES, MIN_SIZE, MIN_SIZE)
    with torch.inference_mode():
        logits = network(clips)
    assert logits.shape == (2, 400, 1)  # per-time-step logits; 9 frames leave one step after the 2-frame pool
    expected = logits.mean(dim=2).double().numpy()
    features = from_state_dict(videos)  # two batches of one clip
    assert features.dtype == np.float64 and features.shape == (2, 400)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        traced = torch.jit.trace(network, clips[:1], check_trace=False)
    torchscript_file = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(StyleGANVDetector(traced)), torchscript_file)
    assert is_torchscript(torchscript_file)
    from_torchscript = I3DFeatureExtractor(replace(SMALL, weights=str(torchscript_file)))
    np.testing.assert_allclose(from_torchscript(videos[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_wrong_keys_and_shapes_are_named(tmp_path, network):
    state = network.state_dict()
    state["Mixed_3b.b0.conv.weight"] = state.pop("Mixed_3b.b0.conv3d.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(KeyError, match=r"missing keys Mixed_3b\.b0\.conv3d\.weight; "
                                       r"unexpected keys Mixed_3b\.b0\.conv\.weight"):
        load_state_dict_i3d(tmp_path / "renamed.pt")

    state = network.state_dict()
    state["logits.conv3d.bias"] = torch.zeros(600)
    torch.save(state, tmp_path / "kinetics600.pt")
    with pytest.raises(ValueError, match=r"logits\.conv3d\.bias \(600,\) != \(400,\)"):
        load_i3d(tmp_path / "kinetics600.pt")

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_i3d(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_i3d(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="I3DConfig.weights is not set"):
        I3DFeatureExtractor(I3DConfig())


def test_preprocessing_protocol(state_dict_file):
    extractor = I3DFeatureExtractor(I3DConfig(weights=state_dict_file))
    videos = np.random.default_rng(1).integers(0, 256, size=(1, 20, 256, 256, 3), dtype=np.uint8)
    clips = extractor.preprocess(videos)
    assert clips.shape == (1, 3, 16, 224, 224)
    # The paper's square 256x256 clips: a plain bilinear resize to 224 of the first 16 frames, then [-1, 1].
    frames = torch.from_numpy(videos[0, :16]).permute(0, 3, 1, 2).float()
    expected = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False) / 127.5 - 1
    torch.testing.assert_close(clips[0].permute(1, 0, 2, 3), expected, rtol=0, atol=1e-5)
    # Non-square: the shorter side goes to 224 and the center is kept, so constant colors survive exactly.
    wide = np.zeros((1, 16, 90, 160, 3), np.uint8)
    wide[..., 0], wide[..., 1], wide[..., 2] = 0, 51, 255
    clip = extractor.preprocess(wide)
    assert clip.shape == (1, 3, 16, 224, 224)
    torch.testing.assert_close(clip[0, :, 0, 100, 100], torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))

    with pytest.raises(ValueError, match="expected uint8"):
        extractor.preprocess(videos.astype(np.float32))
    with pytest.raises(ValueError, match="first 16 frames, got only 10"):
        extractor(videos[:, :10])
