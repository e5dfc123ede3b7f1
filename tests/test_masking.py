import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, from_dict
from pipeline.masking import (
    DecodingConfig,
    MaskingConfig,
    add_code_noise,
    decode_schedule,
    guidance_weights,
    mask_counts,
    mask_ratio,
    masked_cross_entropy,
    parallel_decode,
    sample_drop,
    sample_mask,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: extra intra-op threads only add synchronization, which is very slow on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- training ---------------------------------------------------------------------------------------------------------


def test_mask_ratio_is_the_cosine_schedule():
    r = torch.tensor([0.0, 1 / 3, 0.5, 2 / 3, 1.0])
    expected = torch.tensor([1.0, math.sqrt(3) / 2, math.sqrt(0.5), 0.5, 0.0])
    torch.testing.assert_close(mask_ratio(r), expected, atol=1e-6, rtol=0)


def test_mask_counts_round_up_and_keep_one_masked():
    r = torch.tensor([0.0, 0.5, 2 / 3, 0.999, 1.0])
    assert mask_counts(r, 100).tolist() == [100, 71, 50, 1, 1]
    r = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    counts = mask_counts(r, 37)
    assert counts.min() >= 1 and counts.max() <= 37
    assert (counts[r.argsort()].diff() <= 0).all()  # non-increasing in r


def test_sample_mask_counts_follow_the_drawn_schedule_points():
    batch, length = 64, 50
    mask = sample_mask(batch, length, torch.Generator().manual_seed(3))
    r = torch.rand(batch, generator=torch.Generator().manual_seed(3))  # the same first draw
    assert mask.dtype == torch.bool and mask.shape == (batch, length)
    assert mask.sum(1).tolist() == mask_counts(r, length).tolist()


def test_sample_mask_mean_ratio_is_two_over_pi():
    mask = sample_mask(4000, 64, torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.02  # E[cos(pi/2 r)], r ~ U(0, 1)
    assert abs(mask.float().mean(0) - mask.float().mean()).max() < 0.05  # positions chosen uniformly


def test_masked_cross_entropy_matches_per_factor_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 2, 7, generator=g)
    targets = torch.randint(7, (3, 10, 2), generator=g)
    masked = torch.rand(3, 10, generator=g) < 0.5
    per_position = sum(F.cross_entropy(logits[..., k, :].reshape(-1, 7), targets[..., k].reshape(-1),
                                       reduction="none").view(3, 10) for k in range(2))
    expected = per_position[masked].mean()
    torch.testing.assert_close(masked_cross_entropy(logits, targets, masked), expected)
    with pytest.raises(ValueError, match="no masked position"):
        masked_cross_entropy(logits, targets, torch.zeros(3, 10, dtype=torch.bool))


def test_add_code_noise_replaces_a_bounded_fraction():
    codes = torch.arange(64).repeat(500, 1) % 16
    assert torch.equal(add_code_noise(codes, 0.0, 16, torch.Generator().manual_seed(0)), codes)
    noisy = add_code_noise(codes, 0.5, 16, torch.Generator().manual_seed(0))
    assert noisy.dtype == codes.dtype and noisy.min() >= 0 and noisy.max() < 16
    changed = (noisy != codes).float()
    # p ~ U(0, 0.5), and a replacement hits the same code 1 time in 16: mean 0.25 * 15 / 16
    assert abs(changed.mean().item() - 0.25 * 15 / 16) < 0.02
    assert changed.mean(1).max() < 0.5 + 0.15  # no example far above its cap
    with pytest.raises(ValueError, match="max_fraction"):
        add_code_noise(codes, 1.5, 16)


def test_sample_drop_probability():
    g = torch.Generator().manual_seed(0)
    assert not sample_drop(100, 0.0, g).any()
    assert sample_drop(100, 1.0, g).all()
    assert abs(sample_drop(20000, 0.1, g).float().mean().item() - 0.1) < 0.01


def test_masking_config_rejects_bad_fractions():
    with pytest.raises(ValueError, match="lr_drop"):
        MaskingConfig(lr_drop=1.2)
    with pytest.raises(ConfigError, match="text_drop"):
        from_dict(MaskingConfig, {"text_drop": "often"})


# --- decoding ---------------------------------------------------------------------------------------------------------


def test_decode_schedule_values():
    # floor(16 cos(pi/2 s/4)) for s = 1..4: 14.78, 11.31, 6.12, 0
    assert decode_schedule(16, 4) == [14, 11, 6, 0]
    assert decode_schedule(5, 5) == [4, 3, 2, 1, 0]  # forced to commit one a step
    assert decode_schedule(7, 1) == [0]
    for length, steps in [(1280, 24), (8960, 24), (30, 29)]:
        schedule = decode_schedule(length, steps)
        assert len(schedule) == steps and schedule[-1] == 0
        assert all(a > b for a, b in zip([length] + schedule, schedule))
    with pytest.raises(ValueError, match="steps"):
        decode_schedule(4, 5)
    with pytest.raises(ValueError, match="steps"):
        decode_schedule(4, 0)


class RecordingPredictor:
    """Random logits that depend on the tokens seen; records every call's inputs."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.calls = vocab, []
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def __call__(self, tokens, masked):
        self.calls.append((tokens.clone(), masked.clone()))
        context = tokens.masked_fill(masked[..., None], 0).sum((1, 2)) % self.vocab  # (B,)
        b, n, k = tokens.shape
        position = torch.arange(n * k).view(1, n, k)
        return self.table[(context[:, None, None] + position) % self.vocab] * 3


@pytest.mark.parametrize("length,steps", [(16, 4), (20, 20), (50, 7)])
def test_parallel_decode_fills_every_position_in_exactly_n_steps(length, steps):
    predict = RecordingPredictor(vocab=11)
    tokens = parallel_decode(predict, 3, length, 2, steps=steps, choice_temperature=2.0,
                             generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (3, length, 2) and tokens.min() >= 0 and tokens.max() < 11
    assert len(predict.calls) == steps
    schedule = decode_schedule(length, steps)
    assert [int(m.sum(1).unique()) for _, m in predict.calls] == [length] + schedule[:-1]
    final = (tokens, torch.zeros(3, length, dtype=torch.bool))
    for (t0, m0), (t1, m1) in zip(predict.calls, predict.calls[1:] + [final]):
        assert not (m1 & ~m0).any()  # committed positions are never masked again...
        assert torch.equal(t1[~m0], t0[~m0])  # ...nor changed


def test_parallel_decode_is_deterministic_with_a_seed():
    def run(seed):
        return parallel_decode(RecordingPredictor(vocab=13), 2, 24, 2, steps=6, choice_temperature=4.5,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_parallel_decode_greedy_commits_most_confident_first():
    length, vocab = 8, 5
    logits = torch.zeros(1, length, 1, vocab)
    logits[0, :, 0, 2] = torch.arange(1, length + 1, dtype=torch.float)  # later positions are more confident
    calls = []

    def predict(tokens, masked):
        calls.append(masked.clone())
        return logits

    tokens = parallel_decode(predict, 1, length, 1, steps=3, temperature=0.0)
    assert (tokens == 2).all()
    remaining = decode_schedule(length, 3)[0]
    assert calls[1][0].tolist() == [True] * remaining + [False] * (length - remaining)


def test_parallel_decode_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        parallel_decode(RecordingPredictor(3), 1, 4, 1, steps=5)
    with pytest.raises(ValueError, match="temperature"):
        parallel_decode(RecordingPredictor(3), 1, 4, 1, steps=2, temperature=-1.0)
    with pytest.raises(ValueError, match="steps"):
        DecodingConfig(steps=0)


def test_guidance_weights_edge_cases():
    assert guidance_weights(1.0, 1.0) == {(True, True): 1.0}  # plain conditional: one pass
    assert guidance_weights(0.0, 1.0) == {(True, False): 1.0}  # text ignored
    assert guidance_weights(0.0, 0.0) == {(False, False): 1.0}  # unconditional
    assert guidance_weights(4.0, 1.0) == {(True, True): 4.0, (True, False): -3.0}
    assert guidance_weights(8.0, 2.0) == {(True, True): 8.0, (True, False): -6.0, (False, False): -1.0}
    assert guidance_weights(4.0, 1.0, has_text=False) == {(True, False): 1.0}
    assert guidance_weights(4.0, 2.0, has_text=False) == {(True, False): 2.0, (False, False): -1.0}
    for s_text, s_lr in [(0.5, 3.0), (7.0, 0.0), (2.0, 2.0)]:
        for has_text in (True, False):
            assert sum(guidance_weights(s_text, s_lr, has_text).values()) == pytest.approx(1.0)


def test_guided_formula_matches_written_form():
    g = torch.Generator().manual_seed(0)
    full, lr_only, uncond = (torch.randn(2, 5, 2, 7, generator=g) for _ in range(3))
    passes = {(True, True): full, (True, False): lr_only, (False, False): uncond}
    s_text, s_lr = 3.0, 1.5
    expected = uncond + s_lr * (lr_only - uncond) + s_text * (full - lr_only)
    got = sum(w * passes[c] for c, w in guidance_weights(s_text, s_lr).items())
    torch.testing.assert_close(got, expected)
