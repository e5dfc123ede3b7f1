"""FlexAttention against SDPA (the reference): the LLM's prefix-LM BlockMask and super-resolution's window BlockMasks
give the outputs and gradients of the dense-mask / batched-window SDPA path, on sequences long enough to span several
128-token blocks (so empty, full and partial blocks all occur). Also: the `attention` / `compile` config fields and
checkpoint identity.

PyTorch switches FlexAttention's CPU backward off (its compiled CPU backward does not exist); the eager backward is the
generic dense reference, and `flex_backward_on_cpu` switches it back on so gradients can be compared here.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from pipeline.attention import uses_flex
from pipeline.checkpoint import fingerprint, load_checkpoint, read_metadata, save_checkpoint
from pipeline.config import ConfigError, load_config
from pipeline.llm import LLMConfig, VideoPoetLM, prefix_lm_mask
from pipeline.superres import SuperResConfig, SuperResTransformer
from pipeline.vocab import NUM_SPECIAL, Special

# On CPU FlexAttention runs eagerly, by design here: its warning that this is unfused says nothing new.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

LLM = load_config(LLMConfig, "debug", kind="llm")
# A grid of 256 tokens (two 128-token blocks) whose windows (64, 32 and 64 tokens; low-res 16, 8 and 16) pack several
# to a block.
SR = dataclasses.replace(load_config(SuperResConfig, "debug", kind="superres"), grid=(2, 16, 8),
             windows=((1, 16, 4), (1, 4, 8), (2, 8, 4)))
# float32 kernels sum in different orders: outputs and gradients agree to this (measured: ~1e-7).
ATOL = 1e-5


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def pair(model_class, cfg, seed: int = 0):
    """Two models with the same weights: SDPA and FlexAttention."""
    torch.manual_seed(seed)
    sdpa = model_class(dataclasses.replace(cfg, attention="sdpa"))
    flex = model_class(dataclasses.replace(cfg, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def assert_same_gradients(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-4, msg=name)
            worst = max(worst, float((q.grad - p.grad).abs().max()))
    return worst


def llm_batch(length: int = 300, seed: int = 0):
    """Three right-padded sequences of different lengths and prefix lengths, with text-embedding placeholders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(NUM_SPECIAL, LLM.vocab.size, (3, length), generator=g)
    lengths, prefix = torch.tensor([length, 200, 131]), torch.tensor([100, 150, 7])
    ids[:, 1:4] = Special.TEXT_EMBEDDING
    position = torch.arange(length)[None]
    ids[position >= lengths[:, None]] = Special.PAD
    loss_mask = (position >= prefix[:, None]) & (position < lengths[:, None])
    return ids, prefix, loss_mask, torch.randn(3, 3, LLM.text_width, generator=g)


def test_llm_flex_matches_sdpa_outputs_and_gradients(flex_backward_on_cpu):
    sdpa, flex = pair(VideoPoetLM, LLM)
    ids, prefix, loss_mask, text = llm_batch()
    losses = [m.loss(ids, prefix, loss_mask, text)[0] for m in (sdpa, flex)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    assert_same_gradients(sdpa, flex)
    with torch.no_grad():
        torch.testing.assert_close(flex(ids, prefix, text_embeddings=text), sdpa(ids, prefix, text_embeddings=text),
                                   atol=ATOL, rtol=0)


def test_llm_flex_left_padding_and_the_kv_cache():
    """Left-padded prompts (`start`) under FlexAttention, against SDPA and against the KV-cached generation path
    (which stays on SDPA)."""
    sdpa, flex = pair(VideoPoetLM, LLM)
    ids, _, _, text = llm_batch(length=260)
    start, prefix = torch.tensor([0, 40, 129]), 200
    with torch.no_grad():
        full = flex(ids, prefix, text_embeddings=text, start=start)
        torch.testing.assert_close(full, sdpa(ids, prefix, text_embeddings=text, start=start), atol=ATOL, rtol=0)
        logits, cache = flex.eval().prefill(ids[:, :prefix], 260, text_embeddings=text, start=start)
        torch.testing.assert_close(logits, full[:, prefix - 1], atol=ATOL, rtol=0)
        for t in range(prefix, prefix + 5):
            logits = flex.decode_step(ids[:, t], cache)
        # The cached steps were causal: compare with a forward whose prefix ends where the prompt did.
        torch.testing.assert_close(logits, full[:, prefix + 4], atol=ATOL, rtol=0)


def test_the_mask_rule_as_a_block_mask_is_the_dense_mask():
    from pipeline.attention import block_mask
    from pipeline.llm import prefix_lm_rule

    prefix_end, start, length = torch.tensor([3, 200, 257]), torch.tensor([0, 130, 5]), 300
    dense = prefix_lm_mask(torch.arange(length), length, prefix_end, start)
    mask = block_mask(prefix_lm_rule(prefix_end, start), 3, length, length, torch.device("cpu"))
    blocks = mask.to_dense().bool()  # (B, 1, 3, 3) blocks of 128 x 128
    # The kernel skips the blocks above the causal diagonal of a short-prefix sample.
    assert torch.equal(blocks[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    # Every allowed pair lies in a kept block, and the mask_mod reproduces the dense mask exactly.
    kept = blocks.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :length, :length]
    assert not (dense & ~kept).any()
    b, q, k = torch.meshgrid(torch.arange(3), torch.arange(length), torch.arange(length), indexing="ij")
    assert torch.equal(mask.mask_mod(b, None, q, k), dense[:, 0])


@pytest.mark.parametrize("text_kind", ["embeddings", "none"])
def test_superres_flex_matches_sdpa_outputs_and_gradients(flex_backward_on_cpu, text_kind):
    sdpa, flex = pair(SuperResTransformer, SR)
    g = torch.Generator().manual_seed(1)
    hr = torch.randint(1 << SR.bits, (2, *SR.grid), generator=g)
    lr = torch.randint(1 << SR.bits, (2, *SR.lr_grid), generator=g)
    text = {"embeddings": torch.randn(2, 5, SR.text_dim, generator=g),
            "none": None}[text_kind]
    text_mask = None if text is None else torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    losses = [m.loss(hr, lr, text, text_mask, generator=torch.Generator().manual_seed(2))[0] for m in (sdpa, flex)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    assert_same_gradients(sdpa, flex)


def test_superres_flex_guided_generation_matches_sdpa():
    sdpa, flex = pair(SuperResTransformer, SR)
    g = torch.Generator().manual_seed(3)
    lr = torch.randint(1 << SR.bits, (2, *SR.lr_grid), generator=g)
    text = torch.randn(2, 4, SR.text_dim, generator=g)
    codes = [m.eval().generate(lr, text, steps=2, text_guidance=2.0, generator=torch.Generator().manual_seed(4))
             for m in (sdpa, flex)]
    assert torch.equal(codes[0], codes[1])


# --- configuration ----------------------------------------------------------------------------------------------------


def test_auto_takes_flex_on_cuda_only():
    assert uses_flex("auto", torch.device("cuda", 0)) and not uses_flex("auto", torch.device("cpu"))
    assert uses_flex("flex", torch.device("cpu")) and not uses_flex("sdpa", torch.device("cuda"))


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="LLMConfig.attention"):
        LLMConfig(attention="flash")
    with pytest.raises(ValueError, match="SuperResConfig.attention"):
        dataclasses.replace(SR, attention="auto")
    with pytest.raises(ConfigError, match="attention"):
        load_config(LLMConfig, "debug", ["attention=\"flash\""], kind="llm")
    assert load_config(LLMConfig, "debug", ["attention=flex", "compile=true"], kind="llm").compile
    assert load_config(SuperResConfig, "debug", ["attention=flex"], kind="superres").attention == "flex"
    with pytest.raises(ConfigError, match="compile"):
        load_config(SuperResConfig, "debug", ["compile=1"], kind="superres")


@pytest.mark.parametrize("model_class, cfg", [(VideoPoetLM, LLM), (SuperResTransformer, SR)])
def test_runtime_fields_keep_the_checkpoint_identity(tmp_path, model_class, cfg):
    """attention and compile change how a model runs, not its weights: same state-dict keys and fingerprint, and a
    checkpoint written before the fields existed still loads."""
    torch.manual_seed(0)
    model = model_class(cfg)
    other = model_class(dataclasses.replace(cfg, attention="flex"))
    other.load_state_dict(model.state_dict())
    assert list(other.state_dict()) == list(model.state_dict())
    assert fingerprint(other.config, other.state_dict()) == fingerprint(cfg, model.state_dict())
    save_checkpoint(tmp_path, model, cfg)
    meta = read_metadata(tmp_path)
    for name in ("attention", "compile"):
        del meta["config"][name]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
