"""Device-clean model code: every tensor a model, tokenizer, quantizer or text conditioner creates lands on its input's
device. On a GPU a stray `torch.arange(n)` (no `device=`) fails or syncs; on this CPU-only machine it would pass
unseen, so these tests move the models to a stand-in device and assert that no CPU tensor meets its tensors.

The stand-in: `OnDevice`, a CPU tensor that reports itself as on the `meta` device (so code that asks `x.device` and
creates `device=x.device` tensors follows it), while the arithmetic runs on its CPU data, so data-dependent code
(`.item()`, boolean indexing, k-means) runs for real. Under `device_check()`, factory calls given that device make
`OnDevice` tensors; any op that mixes an `OnDevice` tensor with a CPU tensor of one or more dimensions fails, as it
would on CUDA (zero-dimensional CPU tensors mix with CUDA ones there too, so they pass); explicit copies between the
devices (`.to`, `copy_`) pass.
"""

import contextlib

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_map

from pipeline.adversarial import (
    STFTDiscriminator,
    STFTDiscriminatorConfig,
    VideoDiscriminator,
    VideoDiscriminatorConfig,
)
from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.magvit import MagvitConfig, MagvitModel
from pipeline.quantizers import LFQ, LFQConfig, ResidualVQ, RVQConfig
from pipeline.soundstream import SoundStreamConfig, SoundStreamModel
from pipeline.superres import SuperResConfig, SuperResTransformer, split_codes
from pipeline.text import FrozenTextEncoder, WordVocabulary, stack_embeddings
from pipeline.vocab import NUM_SPECIAL, Special

aten = torch.ops.aten
STAND_IN = torch.device("meta")
COPIES = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}


class OnDevice(Tensor):
    """A CPU tensor `data` that reports itself as on the stand-in device."""

    @staticmethod
    def __new__(cls, data: Tensor):
        return Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(),
                                             storage_offset=data.storage_offset(), dtype=data.dtype,
                                             device=STAND_IN, requires_grad=data.requires_grad)

    def __init__(self, data: Tensor):
        self.data_ = data

    def __repr__(self) -> str:
        return f"OnDevice({self.data_!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


def run_op(func, args, kwargs):
    """Run an aten op on the CPU data of its OnDevice arguments; fail if it mixes them with CPU tensors."""
    strays, on_device, to_cpu = [], False, False

    def unwrap(x):
        nonlocal on_device, to_cpu
        if isinstance(x, OnDevice):
            on_device = True
            return x.data_
        if isinstance(x, Tensor) and x.dim() > 0:
            strays.append(x)
        if isinstance(x, torch.device):
            if x == STAND_IN:
                on_device = True
                return torch.device("cpu")
            to_cpu = x.type == "cpu"
        return x

    data_args, data_kwargs = tree_map(unwrap, (args, kwargs))
    if strays and on_device and func not in COPIES:
        raise AssertionError(f"{func} mixes CPU tensors {[tuple(t.shape) for t in strays]} with tensors on the "
                             "model's device")
    out = func(*data_args, **data_kwargs)
    if not on_device or to_cpu:
        return out
    wrapped = tree_map(lambda t: OnDevice(t) if isinstance(t, Tensor) else t, out)
    return return_and_correct_aliasing(func, args, kwargs, wrapped)


class _Ops(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


class _Factories(TorchFunctionMode):
    """Calls given the stand-in device (torch.tensor, torch.as_tensor, ... build such tensors below the op level)
    run on the CPU and return OnDevice tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:
            return func(*args, **(kwargs or {}))
        placed = False

        def place(x):
            nonlocal placed
            if isinstance(x, torch.device) and x == STAND_IN:
                placed = True
                return torch.device("cpu")
            return x

        args, kwargs = tree_map(place, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if not placed:
            return out
        return tree_map(lambda t: OnDevice(t) if isinstance(t, Tensor) and not isinstance(t, OnDevice) else t, out)


@contextlib.contextmanager
def device_check():
    with _Ops(), _Factories():
        yield


def to_device(x):
    """A module's parameters and buffers, a tensor, or a tuple of tensors moved to the stand-in device."""
    if isinstance(x, nn.Module):
        for module in x.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    module._parameters[name] = nn.Parameter(OnDevice(p.detach()), p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = OnDevice(b)
        return x
    if isinstance(x, tuple):
        return tuple(to_device(t) for t in x)
    return None if x is None else OnDevice(x)


def on_device(*tensors: Tensor) -> bool:
    return all(isinstance(t, OnDevice) for t in tensors)


def backward_reaches_every_parameter(loss: Tensor, model: nn.Module) -> None:
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and on_device(*grads)


# ---------------------------------------------------------------------------------------------------------------------


def test_the_check_catches_stray_cpu_tensors():
    x = to_device(torch.ones(3))
    with device_check():
        with pytest.raises(AssertionError, match="mixes CPU tensors"):
            x + torch.arange(3)
        with pytest.raises(AssertionError, match="mixes CPU tensors"):
            x[torch.tensor([0, 2])]
        # What device-clean code does passes: tensors made on x's device, copies, CPU scalars.
        y = x + torch.arange(3, device=x.device) + torch.tensor([1.0, 2.0, 3.0]).to(x.device) + torch.tensor(2.0)
        assert on_device(y, x.new_zeros(2), torch.as_tensor(0, device=x.device))
        assert y.cpu().tolist() == [4.0, 6.0, 8.0] and not on_device(y.cpu())


def test_llm():
    cfg = load_config(LLMConfig, "debug", kind="llm")
    torch.manual_seed(0)
    model = to_device(VideoPoetLM(cfg))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(NUM_SPECIAL, cfg.vocab.size, (2, 12), generator=g)
    ids[:, 2] = Special.TEXT_EMBEDDING
    prefix = torch.tensor([5, 8])
    loss_mask = torch.arange(12)[None] >= prefix[:, None]
    text = torch.randn(2, 3, cfg.text_width, generator=g)
    ids, prefix, loss_mask, text = to_device((ids, prefix, loss_mask, text))
    with device_check():
        loss, stats = model.loss(ids, prefix, loss_mask, text)
        assert on_device(loss, *stats.values())
        backward_reaches_every_parameter(loss, model)
        model.eval()
        assert on_device(model(ids, 5, text_embeddings=text, start=1))
        logits, cache = model.prefill(ids[:, :6], 9, text_embeddings=text, start=to_device(torch.tensor([0, 2])))
        for _ in range(3):
            logits = model.decode_step(logits.argmax(-1), cache)
        assert on_device(logits)


@pytest.mark.parametrize("text_kind", ["embeddings", "words"])
def test_superres(text_kind):
    cfg = load_config(SuperResConfig, "debug", kind="superres")
    torch.manual_seed(0)
    model = to_device(SuperResTransformer(cfg))
    g = torch.Generator().manual_seed(0)
    hr = torch.randint(1 << cfg.bits, (2, *cfg.grid), generator=g)
    lr = torch.randint(1 << cfg.bits, (2, *cfg.lr_grid), generator=g)
    text = (torch.randn(2, 3, cfg.text_dim, generator=g) if text_kind == "embeddings"
            else torch.randint(cfg.text_vocab, (2, 3), generator=g))
    text_mask = torch.tensor([[True, True, False], [True, True, True]])
    hr, lr, text, text_mask = to_device((hr, lr, text, text_mask))
    with device_check():
        loss, stats = model.loss(hr, lr, text, text_mask)
        assert on_device(loss, *stats.values())
        backward_reaches_every_parameter(loss, model)
        model.eval()
        codes = model.generate(lr, text, text_mask, steps=2, text_guidance=2.0, lr_guidance=1.5)
        assert on_device(codes) and codes.shape == hr.shape
        assert on_device(split_codes(codes, cfg.bits, cfg.factors))


def test_magvit():
    cfg = load_config(MagvitConfig, "debug", kind="video_tokenizer")
    torch.manual_seed(0)
    model = to_device(MagvitModel(cfg))
    video = to_device(torch.rand(1, 3, 5, 16, 16) * 2 - 1)
    with device_check():
        loss, terms = model.loss(video)
        assert on_device(loss, *terms.values())
        backward_reaches_every_parameter(loss, model)
        codes = model.encode(video)
        assert on_device(codes, model.decode(codes))


def test_soundstream():
    cfg = load_config(SoundStreamConfig, "debug", kind="audio_tokenizer")
    torch.manual_seed(0)
    model = to_device(SoundStreamModel(cfg))
    audio = to_device(torch.randn(2, 1280) * 0.1)
    with device_check():
        loss, terms = model.loss(audio)  # training mode: the RVQ codebooks run k-means and restart dead codes
        assert on_device(loss, *terms.values())
        backward_reaches_every_parameter(loss, model)
        model.eval()
        codes = model.encode(audio)
        assert on_device(codes, model.decode(codes), model.decode(codes[:, :1]))


def test_discriminators():
    torch.manual_seed(0)
    video_disc = to_device(VideoDiscriminator(VideoDiscriminatorConfig(channels=4, channel_mults=(1, 2))))
    audio_disc = to_device(STFTDiscriminator(STFTDiscriminatorConfig(channels=4, window=64, hop=16, strides=(2, 2))))
    real, fake = to_device((torch.rand(1, 3, 5, 16, 16), torch.rand(1, 3, 5, 16, 16)))
    real_audio, fake_audio = to_device((torch.randn(2, 640), torch.randn(2, 640)))
    with device_check():
        loss, terms = video_disc.discriminator_loss(real, fake)
        assert on_device(loss, *terms.values(), video_disc.generator_loss(fake), video_disc.ema_real)
        loss, _ = audio_disc.discriminator_loss(real_audio, fake_audio)
        total, terms = audio_disc.generator_loss(real_audio, fake_audio)
        assert on_device(loss, total, *terms.values())


def test_quantizers():
    lfq = to_device(LFQ(LFQConfig(bits=6, entropy_group_bits=3)))
    rvq = to_device(ResidualVQ(RVQConfig(levels=2, codebook_size=8, kmeans_iters=2, dead_code_threshold=10.0), 4))
    z = to_device(torch.randn(2, 5, 6, requires_grad=True))
    x = to_device(torch.randn(40, 4))
    with device_check():
        out = lfq(z)
        assert on_device(out.latent, out.codes, out.loss, lfq.decode_codes(out.codes))
        out.loss.backward()
        assert on_device(z.grad)
        for _ in range(2):  # initialization, then an update that restarts dead codes
            out = rvq(x)
        assert on_device(out.latent, out.codes, out.loss, rvq.decode_codes(out.codes))


class TinyEncoder(nn.Module):
    def __init__(self, words: int, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(words, width)
        self.proj = nn.Linear(width, width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.proj(self.embed(ids)) * mask[..., None]


def test_text_conditioners():
    words = WordVocabulary.build(["a red circle", "a blue square"])
    assert words.condition(["a red square"])[0].tokens.dtype == np.int64  # word ids stay numpy, no tensors
    torch.manual_seed(0)
    encoder = FrozenTextEncoder(TinyEncoder(words.size), words)
    to_device(encoder.module)
    with device_check():
        conditions = encoder.condition(["a red circle", "", "a blue square moving"])
        assert conditions[1].embeddings is None
        batch = stack_embeddings(conditions)
        assert on_device(conditions[0].embeddings, batch) and batch.shape == (3, 4, 8)
