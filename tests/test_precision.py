"""Precision and compilation: a bf16 autocast forward/backward of the LLM and super-resolution (debug flavors) against
float32; bf16 parameters (as DeepSpeed's bf16 mode casts them); quantizers that ignore autocast; `compile = true`
against eager.

Tolerances (bf16 keeps 8 mantissa bits, a relative step of 2^-8 = 0.4%): the loss within 1% of float32, the gradient
(all parameters as one vector) at cosine similarity > 0.999 and relative L2 error < 5% (measured on CPU: loss 1e-5
relative, cosine 0.99999, relative error 0.4%).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.quantizers import LFQ, LFQConfig, ResidualVQ, RVQConfig
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.vocab import NUM_SPECIAL, Special

LLM = load_config(LLMConfig, "debug", kind="llm")
SR = load_config(SuperResConfig, "debug", kind="superres")


def llm_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(NUM_SPECIAL, LLM.vocab.size, (3, 40), generator=g)
    ids[:, 1:4] = Special.TEXT_EMBEDDING
    prefix = torch.tensor([10, 20, 30])
    loss_mask = torch.arange(40)[None] >= prefix[:, None]
    return ids, prefix, loss_mask, torch.randn(3, 3, LLM.text_width, generator=g)


def sr_batch(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(1 << SR.bits, (batch, *SR.grid), generator=g),
            torch.randint(1 << SR.bits, (batch, *SR.lr_grid), generator=g),
            torch.randn(batch, 5, SR.text_dim, generator=g), torch.ones(batch, 5, dtype=torch.bool))


def llm_loss(model, batch):
    return model.loss(*batch)[0]


def sr_loss(model, batch):
    return model.loss(*batch, generator=torch.Generator().manual_seed(1))[0]


def loss_and_gradient(model, loss_fn, batch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


CASES = {"llm": (VideoPoetLM, LLM, llm_loss, llm_batch), "superres": (SuperResTransformer, SR, sr_loss, sr_batch)}


@pytest.mark.parametrize("name", CASES)
def test_bf16_autocast_matches_float32(name):
    model_class, cfg, loss_fn, batch_fn = CASES[name]
    torch.manual_seed(0)
    model, batch = model_class(cfg), batch_fn()
    loss32, grad32 = loss_and_gradient(model, loss_fn, batch, autocast=False)
    loss16, grad16 = loss_and_gradient(model, loss_fn, batch, autocast=True)
    assert loss16.dtype == torch.float32  # the loss itself is computed in float32 under autocast
    assert abs(loss16 - loss32) < 0.01 * loss32
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.999
    assert (grad16 - grad32).norm() < 0.05 * grad32.norm()


@pytest.mark.parametrize("name", CASES)
def test_bf16_parameters_train(name):
    """DeepSpeed's bf16 mode casts the parameters (no autocast): inputs in float32 (text embeddings) must still fit,
    and the loss stays within bf16 reach of float32."""
    model_class, cfg, loss_fn, batch_fn = CASES[name]
    torch.manual_seed(0)
    model, batch = model_class(cfg), batch_fn()
    loss32 = loss_fn(model, batch).item()
    model.to(torch.bfloat16)
    loss16 = loss_fn(model, batch)
    loss16.backward()
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32) < 0.05 * loss32
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.grad is not None)


def test_quantizers_ignore_autocast():
    torch.manual_seed(0)
    lfq, rvq = LFQ(LFQConfig(bits=8, entropy_group_bits=4)), ResidualVQ(RVQConfig(levels=2, codebook_size=16), 6)
    rvq.eval()
    rvq(torch.randn(64, 6))  # eval mode: codebooks as initialized, no update
    z, x = torch.randn(4, 8, requires_grad=True), torch.randn(32, 6)
    reference = lfq(z), rvq(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = lfq(z), rvq(x)
        bf16_input = lfq(z.bfloat16()), rvq(x.bfloat16())
    for ref, out in zip(reference, under_autocast):
        assert torch.equal(out.codes, ref.codes) and torch.equal(out.loss, ref.loss)
        assert out.latent.dtype == torch.float32 and torch.equal(out.latent, ref.latent)
    # bf16 latents: the straight-through output is exactly the codeword, rounded once to bf16.
    lfq_out, rvq_out = bf16_input
    assert lfq_out.latent.dtype == torch.bfloat16 and torch.equal(lfq_out.latent.abs(), torch.ones(4, 8).bfloat16())
    assert torch.equal(rvq_out.latent, rvq.decode_codes(rvq_out.codes).bfloat16())
    assert lfq_out.loss.dtype == rvq_out.loss.dtype == torch.float32


@pytest.mark.parametrize("name, backend", [("llm", "inductor"),
                                           pytest.param("superres", "aot_eager", marks=pytest.mark.heavy)])
def test_compiled_blocks_match_eager(name, backend, monkeypatch):
    """compile = true compiles each block in place: same state-dict keys, one graph per block without breaks, the
    same loss and gradients. Super-resolution's block is traced and differentiated (aot_eager) but not built by
    Inductor, whose C++ build of it takes minutes on a loaded 2-core CPU (the LLM's takes ~20 s)."""
    from torch._dynamo.utils import counters

    compile_block = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: compile_block(module, backend=backend))
    torch._dynamo.reset()
    counters.clear()
    model_class, cfg, loss_fn, batch_fn = CASES[name]
    torch.manual_seed(0)
    eager = model_class(cfg)
    compiled = model_class(dataclasses.replace(cfg, compile=True))
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = batch_fn()
    loss, grad = loss_and_gradient(eager, loss_fn, batch, autocast=False)
    compiled_loss, compiled_grad = loss_and_gradient(compiled, loss_fn, batch, autocast=False)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # every block reuses one graph
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled_grad, grad, atol=1e-5, rtol=1e-4)
