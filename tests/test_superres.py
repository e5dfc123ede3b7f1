import itertools
import math
import time
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from pipeline.config import load_config
from pipeline.superres import (
    LayerMasks,
    SuperResConfig,
    SuperResTransformer,
    WindowLayer,
    lowres_window,
    merge_codes,
    merge_windows,
    partition_windows,
    split_codes,
    text_mask,
    window_masks,
)

FLAVORS = ("debug", "demo", "paper")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: extra intra-op threads only add synchronization, which is very slow on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def debug_config(**changes) -> SuperResConfig:
    return replace(load_config(SuperResConfig, "debug", kind="superres"), **changes)


def debug_model(seed: int = 0, **changes) -> SuperResTransformer:
    torch.manual_seed(seed)
    return SuperResTransformer(debug_config(**changes)).eval()


def random_inputs(cfg: SuperResConfig, batch: int = 2, text_len: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hr = torch.randint(1 << cfg.bits, (batch, *cfg.grid), generator=g)
    lr = torch.randint(1 << cfg.bits, (batch, *cfg.lr_grid), generator=g)
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    return hr, lr, text


def decoder_inputs(model: SuperResTransformer, batch: int = 2, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(cfg.sub_vocab, (batch, model.length, cfg.factors), generator=g)
    masked = torch.rand(batch, model.length, generator=g) < 0.5
    return tokens, masked


# --- k = 2 factorization ----------------------------------------------------------------------------------------------


def test_factorization_round_trip_every_code():
    codes = torch.arange(1 << 8)
    sub = split_codes(codes, 8, 2)
    assert sub.shape == (256, 2) and sub.max() == 15
    assert torch.equal(sub[:, 0] + 16 * sub[:, 1], codes)  # low bits first
    assert torch.equal(merge_codes(sub, 8), codes)
    assert len({tuple(s) for s in sub.tolist()}) == 256  # a bijection onto pairs


def test_factorization_paper_codes_are_two_512_way_choices():
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.tensor([0, 1, 511, 512, (1 << 18) - 1]), torch.randint(1 << 18, (10000,), generator=g)])
    sub = split_codes(codes.view(5, -1, 1), 18, 2)
    assert sub.shape == (5, 2001, 1, 2) and sub.min() >= 0 and sub.max() == 511
    assert torch.equal(merge_codes(sub, 18), codes.view(5, -1, 1))
    assert split_codes(torch.tensor(513), 18, 2).tolist() == [1, 1]
    codes12 = codes % (1 << 12)
    assert torch.equal(merge_codes(split_codes(codes12, 12, 3), 12), codes12)  # any k that divides the bits
    with pytest.raises(ValueError, match="bits=9"):
        split_codes(codes, 9, 2)


# --- windows ----------------------------------------------------------------------------------------------------------


def all_windows():
    for flavor in FLAVORS:
        cfg = load_config(SuperResConfig, flavor, kind="superres")
        for window in cfg.windows:
            yield pytest.param(cfg.grid, window, id=f"{flavor}-hr-{window}")
            yield pytest.param(cfg.lr_grid, lowres_window(window), id=f"{flavor}-lr-{window}")


@pytest.mark.parametrize("grid,window", list(all_windows()))
def test_partition_and_merge_are_exact_inverses(grid, window):
    x = torch.randn(2, *grid, 3)
    windows = partition_windows(x, window)
    count = (grid[0] // window[0]) * (grid[1] // window[1]) * (grid[2] // window[2])
    assert windows.shape == (2 * count, window[0] * window[1] * window[2], 3)
    assert torch.equal(merge_windows(windows, window, grid), x)
    assert torch.equal(partition_windows(merge_windows(windows, window, grid), window), windows)


def test_partition_matches_slicing_reference():
    grid, window = (2, 4, 6), (1, 2, 3)
    x = torch.randn(1, *grid, 2)
    windows = partition_windows(x, window)
    starts = itertools.product(range(0, 2, 1), range(0, 4, 2), range(0, 6, 3))
    for i, (t, h, w) in enumerate(starts):  # (t, h, w) raster order of windows, raster order inside
        expected = x[0, t:t + 1, h:h + 2, w:w + 3].reshape(-1, 2)
        assert torch.equal(windows[i], expected)
    with pytest.raises(ValueError, match="does not tile"):
        partition_windows(x, (1, 3, 3))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_lowres_windows_cover_the_same_area_as_highres_windows(flavor):
    cfg = load_config(SuperResConfig, flavor, kind="superres")

    def coordinates(grid):
        axes = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        return torch.stack(axes, -1)[None]  # (1, t, h, w, 3)

    for window in cfg.windows:
        hr = partition_windows(coordinates(cfg.grid), window)
        lr = partition_windows(coordinates(cfg.lr_grid), lowres_window(window))
        assert hr.shape[0] == lr.shape[0]
        hr_cover = hr // torch.tensor([1, 2, 2])  # the low-res position under each high-res one
        for i in range(hr.shape[0]):
            assert {tuple(p) for p in hr_cover[i].tolist()} == {tuple(p) for p in lr[i].tolist()}


def window_mask(grid, window, target: int) -> Tensor:
    """(2, t, h, w) bool: True inside window `target` of both examples of a batch of 2."""
    marks = partition_windows(torch.zeros(2, *grid, 1), window)
    marks[target::marks.shape[0] // 2] = 1
    return merge_windows(marks, window, grid)[..., 0].bool()


def outside_window_change(cfg: SuperResConfig, layer_window, region, target: int):
    """A layer's output for one input, and for that input with every token outside window `target` of the tiling
    `region` changed (and every low-res token outside the low-res window), with the window's mask; the layer runs
    with the config's attention kernel."""
    torch.manual_seed(0)
    layer = WindowLayer(cfg.width, cfg.heads, cfg.mlp_ratio, layer_window).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *cfg.grid, cfg.width, generator=g)
    lr = torch.randn(2, *cfg.lr_grid, cfg.width, generator=g)
    text = torch.randn(2, 4, cfg.width, generator=g)
    keep = torch.ones(2, 4, dtype=torch.bool)
    inside = window_mask(cfg.grid, region, target)
    lr_inside = window_mask(cfg.lr_grid, lowres_window(region), target)
    x2 = torch.where(inside[..., None], x, torch.randn(x.shape, generator=g))
    lr2 = torch.where(lr_inside[..., None], lr, torch.randn(lr.shape, generator=g))
    masks = LayerMasks(*window_masks(cfg.attention, cfg.grid, layer_window, x.device),
                       text_mask(cfg.attention, math.prod(cfg.grid), keep))
    with torch.no_grad():
        return layer(x, lr, text, masks), layer(x2, lr2, text, masks), inside


@pytest.mark.parametrize("flavor, attention", [("debug", "sdpa"), ("demo", "sdpa"), ("demo", "flex")])
def test_attention_never_crosses_a_window(flavor, attention):
    cfg = replace(load_config(SuperResConfig, flavor, kind="superres"), attention=attention)
    for window in cfg.windows:
        before, after, inside = outside_window_change(cfg, window, window, target=1)
        torch.testing.assert_close(after[inside], before[inside], atol=1e-5, rtol=0)
        assert not torch.allclose(after[~inside], before[~inside])


def test_full_grid_window_mixes_everything():
    """The locality check above can fail: one window the size of the grid (full attention) sees the change."""
    cfg = debug_config()
    before, after, inside = outside_window_change(cfg, cfg.grid, cfg.windows[2], target=1)
    assert not torch.allclose(after[inside], before[inside], atol=1e-3)


# --- model ------------------------------------------------------------------------------------------------------------


def test_flavors():
    paper = load_config(SuperResConfig, "paper", kind="superres")
    assert paper.grid == (5, 56, 32) and paper.lr_grid == (5, 28, 16)
    assert paper.windows == ((1, 56, 4), (1, 8, 32), (5, 8, 8))
    assert [lowres_window(w) for w in paper.windows] == [(1, 28, 2), (1, 4, 16), (5, 4, 4)]
    assert paper.sub_vocab == 512 and paper.decoding.steps == 24
    with torch.device("meta"):
        params = sum(p.numel() for p in SuperResTransformer(paper).parameters())
    assert 0.9e9 < params < 1.1e9  # the paper's 1B first stage
    demo = load_config(SuperResConfig, "demo", kind="superres")
    assert demo.grid == (3, 16, 16) and demo.lr_grid == (3, 8, 8)  # the demo's 9-frame clips


def test_config_rejects_bad_windows():
    with pytest.raises(ValueError, match="does not tile"):
        debug_config(windows=((1, 4, 3),))
    with pytest.raises(ValueError, match="even h and w"):
        debug_config(grid=(2, 4, 6), windows=((1, 4, 3),))
    with pytest.raises(ValueError, match="multiples of 2"):
        debug_config(grid=(2, 4, 5), windows=((1, 4, 5),))
    with pytest.raises(ValueError, match="heads"):
        debug_config(heads=3)


def test_debug_forward_backward_is_fast():
    model = debug_model().train()
    hr, lr, text = random_inputs(model.config)

    def step():
        start = time.perf_counter()
        loss, stats = model.loss(hr, lr, text, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return time.perf_counter() - start, loss, stats

    best, loss, stats = min(step() for _ in range(5))  # the best of a few: the CPU is shared
    assert best < 0.5
    assert set(stats) == {"loss", "accuracy", "factor_accuracy", "mask_ratio"}
    assert abs(loss.item() - 2 * math.log(16)) < 0.3  # near uniform over two 16-way choices at init
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.threshold
def test_debug_model_learns_a_batch():
    model = debug_model().train()
    hr, lr, text = random_inputs(model.config)

    def held_out_loss():
        return model.loss(hr, lr, text, generator=torch.Generator().manual_seed(123))[0].item()

    before = held_out_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(80):
        opt.zero_grad()
        model.loss(hr, lr, text, generator=torch.Generator().manual_seed(step))[0].backward()
        opt.step()
    # Over seeds 0-5, 1/2/4 threads, AVX-512 and AVX2 the ratio is 0.36-0.58 after 40 steps (0.575 at this seed: no
    # margin) and 0.15-0.41 after 80.
    assert held_out_loss() < 0.6 * before


def test_loss_is_deterministic_with_a_generator():
    model = debug_model()
    hr, lr, text = random_inputs(model.config)
    a = model.loss(hr, lr, text, generator=torch.Generator().manual_seed(5))[0]
    b = model.loss(hr, lr, text, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_dropped_conditions():
    model = debug_model()
    _, lr, text = random_inputs(model.config)
    tokens, masked = decoder_inputs(model)
    yes, no = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, masked, lr, text, drop_text=yes), model(tokens, masked, lr, None))
        other_lr = torch.randint(1 << model.config.bits, lr.shape)
        torch.testing.assert_close(model(tokens, masked, lr, text, drop_lr=yes),
                                   model(tokens, masked, other_lr, text, drop_lr=yes))
        assert not torch.allclose(model(tokens, masked, lr, text, drop_lr=no), model(tokens, masked, other_lr, text))
        per_example = model(tokens, masked, lr, text, drop_text=torch.tensor([True, False]))
        torch.testing.assert_close(per_example[0], model(tokens[:1], masked[:1], lr[:1], None)[0])
        torch.testing.assert_close(per_example[1], model(tokens[1:], masked[1:], lr[1:], text[1:])[0])
        padded = torch.cat([text, torch.randn(2, 2, model.config.text_dim)], 1)
        keep = torch.tensor([[True] * 3 + [False] * 2] * 2)
        torch.testing.assert_close(model(tokens, masked, lr, padded, keep), model(tokens, masked, lr, text))


def test_text_as_word_ids():
    model = debug_model()
    hr, lr, _ = random_inputs(model.config)
    tokens, masked = decoder_inputs(model)
    words = torch.tensor([[3, 1, 4], [1, 5, 9]])
    padded = torch.cat([words, torch.zeros(2, 2, dtype=torch.long)], 1)
    keep = torch.tensor([[True] * 3 + [False] * 2] * 2)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, masked, lr, padded, keep), model(tokens, masked, lr, words))
        assert not torch.allclose(model(tokens, masked, lr, words), model(tokens, masked, lr, None))
    loss, _ = model.loss(hr, lr, words, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert model.text_words.weight.grad.abs().sum() > 0
    assert model.generate(lr, padded, keep, steps=2).shape == hr.shape
    with pytest.raises(ValueError, match=r"word ids must lie in \[0, 32\)"):
        model.loss(hr, lr, words + 32)
    with pytest.raises(TypeError, match="expected float embeddings, got torch.int64"):
        debug_model(text_vocab=0).loss(hr, lr, words)


def test_masked_positions_ignore_their_placeholder_tokens():
    model = debug_model()
    _, lr, text = random_inputs(model.config)
    tokens, masked = decoder_inputs(model)
    other = torch.where(masked[..., None], torch.randint_like(tokens, model.config.sub_vocab), tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, masked, lr, text), model(other, masked, lr, text))


@pytest.mark.parametrize("with_text", [True, False])
def test_guided_logits_against_separate_passes(with_text):
    model = debug_model()
    _, lr, text = random_inputs(model.config)
    text = text if with_text else None
    tokens, masked = decoder_inputs(model)
    all_ = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        full = model(tokens, masked, lr, text)
        lr_only = model(tokens, masked, lr, text, drop_text=all_)
        uncond = model(tokens, masked, lr, text, drop_lr=all_, drop_text=all_)

        def guided(s_text, s_lr):
            return model.guided_logits(tokens, masked, lr, text, None, s_text, s_lr)

        torch.testing.assert_close(guided(1.0, 1.0), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided(0.0, 1.0), lr_only, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided(0.0, 0.0), uncond, atol=1e-5, rtol=1e-5)
        expected = uncond + 1.5 * (lr_only - uncond) + 3.0 * (full - lr_only)
        torch.testing.assert_close(guided(3.0, 1.5), expected, atol=1e-4, rtol=1e-4)


def test_generate_shapes_determinism_and_guidance_one():
    model = debug_model()
    _, lr, text = random_inputs(model.config)

    def run(seed, **kw):
        return model.generate(lr, text, generator=torch.Generator().manual_seed(seed), **kw)

    codes = run(0)
    assert codes.shape == (2, *model.config.grid) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 1 << model.config.bits
    assert torch.equal(run(0), codes) and not torch.equal(run(1), codes)
    assert run(0, steps=1, temperature=0.0).shape == codes.shape
    greedy = run(0, steps=1, temperature=0.0, text_guidance=1.0, lr_guidance=1.0)
    with torch.no_grad():
        masked = torch.ones(2, model.length, dtype=torch.bool)
        logits = model(torch.zeros(2, model.length, 2, dtype=torch.long), masked, lr, text)
    assert torch.equal(greedy.flatten(1), merge_codes(logits.argmax(-1), model.config.bits))


def test_bad_inputs_name_the_input():
    model = debug_model()
    hr, lr, text = random_inputs(model.config)
    with pytest.raises(ValueError, match="lr_codes: expected shape"):
        model.generate(hr)
    with pytest.raises(TypeError, match="hr_codes"):
        model.loss(hr.float(), lr)
    with pytest.raises(ValueError, match=r"hr_codes: values must lie in \[0, 2\^8\)"):
        model.loss(hr + 256, lr)
    with pytest.raises(ValueError, match="text: expected embeddings"):
        model.loss(hr, lr, text[..., :5])
    with pytest.raises(ValueError, match="lr_codes: batch"):
        model.loss(hr, lr[:1])
    with pytest.raises(ValueError, match="text_mask"):
        model.loss(hr, lr, text, torch.ones(2, 3))
