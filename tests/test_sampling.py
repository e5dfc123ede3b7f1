import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.llm import LLMConfig, VideoPoetLM
from pipeline.sampling import drop_text, filter_logits, generate, generate_uncached, sample
from pipeline.sequence import TASKS, Layout, Task, build_prompt, build_sequence, parse_sequence
from pipeline.vocab import Special, Vocabulary

DEBUG = load_config(LLMConfig, "debug", kind="llm")
VOCAB = DEBUG.vocab
RNG = np.random.default_rng(0)
VIDEO = RNG.integers(0, VOCAB.video_codes, (2, 2, 2))
AUDIO = RNG.integers(0, VOCAB.audio_codes, (VOCAB.audio_levels, 3))
WORDS = np.array([3, 1, 4, 1])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoPoetLM(DEBUG).eval()


def condition(task: Task, text: str = "tokens"):
    """A layout of `task` on the debug vocabulary and its prompt; text as word `tokens` or `embeddings`."""
    spec = TASKS[task]
    video = VIDEO[:1] if spec.video_out == "image" else VIDEO
    layout_kw, prompt_kw = {}, {}
    if spec.text != "none" and text == "tokens":
        layout_kw["text_tokens"], prompt_kw["text"] = len(WORDS), WORDS
    elif spec.text != "none":
        layout_kw["text_embeddings"] = 3
    if spec.uses_audio:
        layout_kw["audio"] = AUDIO.shape
    if spec.video_in == "context":
        layout_kw["context_frames"] = 1
    if spec.audio_in == "context":
        layout_kw["context_audio_frames"] = 1
    layout = Layout(task, VOCAB, video.shape, **layout_kw)
    if spec.video_in != "none":
        prompt_kw["video"] = video[:layout.input_video_shape[0]]
    if spec.video_in == "masked":
        prompt_kw["mask"] = np.arange(video.size).reshape(video.shape) % 2 == 0
    if spec.audio_in != "none":
        prompt_kw["audio"] = AUDIO[:, :layout.input_audio_shape[1]]
    return layout, build_prompt(layout, **prompt_kw)


def embeddings(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DEBUG.text_width, generator=torch.Generator().manual_seed(seed))


def test_cached_logits_match_the_full_forward(model):
    # Two different clips of one layout, teacher-forced through prefill + decode_step.
    seqs = [build_sequence(Task.IMAGE_TO_VIDEO, VOCAB, VIDEO + i, text_embeddings=3) for i in range(2)]
    ids = torch.from_numpy(np.stack([s.ids for s in seqs]))
    p, n = seqs[0].prefix_length, len(seqs[0].ids)
    text = torch.stack([embeddings(seed=0), embeddings(seed=1)])
    full = model(ids, p, text_embeddings=text)
    logits, cache = model.prefill(ids[:, :p], n - 1, text_embeddings=text)
    steps = [logits] + [model.decode_step(ids[:, t], cache) for t in range(p, n - 1)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, p - 1:n - 1], atol=1e-5, rtol=1e-4)
    assert cache.length == n - 1


def test_cached_logits_with_a_left_padded_row(model):
    # A text-to-video sequence and the same clip without text: the shorter is left-padded, as in a guided batch.
    cond = build_sequence(Task.TEXT_TO_VIDEO, VOCAB, VIDEO, text=WORDS)
    uncond = build_sequence(Task.UNCONDITIONAL, VOCAB, VIDEO)
    pad = cond.prefix_length - uncond.prefix_length
    ids = torch.from_numpy(np.stack([cond.ids, np.concatenate([np.zeros(pad, np.int64), uncond.ids])]))
    start = torch.tensor([0, pad])
    p, n = cond.prefix_length, len(cond.ids)
    logits, cache = model.prefill(ids[:, :p], n - 1, start=start)
    steps = torch.stack([logits] + [model.decode_step(ids[:, t], cache) for t in range(p, n - 1)], dim=1)
    for row, seq in enumerate((cond, uncond)):
        alone = model(torch.from_numpy(seq.ids)[None], seq.prefix_length)[0, seq.prefix_length - 1:-1]
        torch.testing.assert_close(steps[row], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("task", [Task.TEXT_TO_VIDEO, Task.AUDIO_VIDEO_CONTINUATION, Task.VIDEO_TO_AUDIO])
def test_cached_generation_equals_uncached(model, task):
    layout, prompt = condition(task)
    cached = generate(model, layout, prompt, temperature=0)
    assert (cached == generate_uncached(model, layout, prompt, temperature=0)).all()
    parse_sequence(cached[0], layout)


def test_cached_equals_uncached_with_guidance_and_text_embeddings(model):
    layout, prompt = condition(Task.TEXT_TO_VIDEO, text="embeddings")
    options = dict(text_embeddings=embeddings(), guidance=3.0, temperature=0)
    assert (generate(model, layout, prompt, **options) == generate_uncached(model, layout, prompt, **options)).all()


@pytest.mark.parametrize("text", ["tokens", "embeddings"])
@pytest.mark.parametrize("task", list(Task))
def test_every_sample_parses(model, task, text):
    layout, prompt = condition(task, text)
    text_kw = {"text_embeddings": embeddings()} if layout.text_embeddings else {}
    ids = generate(model, layout, np.stack([prompt] * 3), seed=1, **text_kw)
    assert ids.shape == (3, layout.length)
    for row in ids:
        np.testing.assert_array_equal(row[:layout.prefix_length], prompt)
        parsed = parse_sequence(row, layout)
        assert parsed.video.shape[1:] == VIDEO.shape[1:]
    # Random weights sample near-uniformly: the three samples differ.
    assert len({row.tobytes() for row in ids}) == 3


def test_guidance_one_equals_no_guidance(model):
    layout, prompt = condition(Task.TEXT_TO_VIDEO)
    plain = generate(model, layout, prompt, seed=5)
    # The empty condition (shorter) and a longer negative prompt, which left-pads the conditional row instead.
    negative_layout = dataclasses.replace(layout, text_tokens=9)
    negative = build_prompt(negative_layout, text=np.arange(9) % VOCAB.text_size)
    assert (generate(model, layout, prompt, uncond_prompt_ids=drop_text(prompt, layout), seed=5) == plain).all()
    assert (generate(model, layout, prompt, uncond_prompt_ids=negative, seed=5) == plain).all()


def test_guidance_combines_separate_conditional_and_unconditional_logits(model):
    layout, prompt = condition(Task.TEXT_TO_VIDEO)
    guidance = 4.0
    ids = generate(model, layout, prompt, guidance=guidance, temperature=0)[0]
    uncond_prompt = drop_text(prompt, layout)
    assert len(uncond_prompt) == len(prompt) - len(WORDS) - 2
    # Reference: each condition run alone over the sequence so far, no padding, no cache.
    low, high = layout.valid_ranges()
    p = layout.prefix_length
    for t in range(p, layout.length):
        cond = model(torch.from_numpy(ids[None, :t]), p)[0, -1]
        uncond = model(torch.from_numpy(np.concatenate([uncond_prompt, ids[p:t]])[None]), len(uncond_prompt))[0, -1]
        guided = cond + (guidance - 1) * (cond - uncond)
        assert ids[t] == low[t] + int(guided[low[t]:high[t]].argmax())
    assert not (ids == generate(model, layout, prompt, temperature=0)[0]).all()


def test_seeds_reproduce_and_differ(model):
    layout, prompt = condition(Task.TEXT_TO_VIDEO)
    a, b, c = (generate(model, layout, prompt, seed=s, top_k=50, top_p=0.9) for s in (7, 7, 8))
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("options", [dict(temperature=0), dict(top_k=50, top_p=0.9), dict(guidance=2.0, top_k=20)])
def test_a_batch_gives_each_row_what_it_gets_alone(model, options):
    """Row i of a batch is the prompt sampled alone with seed + i, forced positions per row included: batching is
    only faster, never different."""
    layout, _ = condition(Task.IMAGE_TO_VIDEO)
    videos = [RNG.integers(0, VOCAB.video_codes, VIDEO.shape) for _ in range(3)]
    prompts = np.stack([build_prompt(layout, text=WORDS, video=v[:1]) for v in videos])
    forced = np.stack([VOCAB.video_to_unified(v[0].reshape(-1)) for v in videos])
    batch = generate(model, layout, prompts, seed=11, forced=forced, **options)
    for row in range(3):
        alone = generate(model, layout, prompts[row], seed=11 + row, forced=forced[row], **options)[0]
        np.testing.assert_array_equal(batch[row], alone)
        np.testing.assert_array_equal(batch[row, layout.prefix_length:][:forced.shape[1]], forced[row])
    order = [1, 0, 2]  # seeds given row by row follow their rows
    np.testing.assert_array_equal(generate(model, layout, prompts[order], seed=[12, 11, 13], forced=forced[order],
                                           **options), batch[order])
    with pytest.raises(ValueError, match="seed: 2 seeds for 3 prompts"):
        generate(model, layout, prompts, seed=[1, 2], forced=forced)
    with pytest.raises(ValueError, match=r"forced: expected \(F,\) or \(3, F\) ids"):
        generate(model, layout, prompts, forced=forced[:2])


def test_filter_logits_against_a_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g)
    for top_k in (0, 1, 5, 40, 100):
        for top_p in (0.05, 0.5, 0.9, 1.0):
            kept = torch.isfinite(filter_logits(logits, top_k, top_p))
            for row, values in enumerate(logits.numpy()):
                order = np.argsort(-values)
                allowed = set(order[:top_k] if top_k else order)
                if top_p < 1:
                    # The nucleus of the top-k survivors' renormalized probabilities: the fewest reaching top_p.
                    k = len(allowed)
                    probs = np.exp(values[order[:k]] - values.max())
                    probs /= probs.sum()
                    needed = int(np.searchsorted(np.cumsum(probs), top_p - 1e-7) + 1)
                    allowed = set(order[:min(needed, k)])
                assert set(np.flatnonzero(kept[row].numpy())) == allowed, (top_k, top_p, row)


def test_sampling_follows_the_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None].repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = lambda **kw: np.bincount(sample(logits, generator=g, **kw).numpy(), minlength=4) / len(logits)
    np.testing.assert_allclose(counts(), probs, atol=0.015)
    np.testing.assert_allclose(counts(top_k=2), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    np.testing.assert_allclose(counts(top_p=0.65), [4 / 7, 3 / 7, 0, 0], atol=0.015)
    np.testing.assert_allclose(counts(top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.015)
    assert (sample(logits[:3], temperature=0) == 0).all()
    # Temperature T samples in proportion to p^(1/T).
    np.testing.assert_allclose(counts(temperature=0.5), probs ** 2 / (probs ** 2).sum(), atol=0.015)


def test_drop_text():
    layout, prompt = condition(Task.AUDIO_VIDEO_CONTINUATION)
    bot = int(np.flatnonzero(prompt == Special.BOT_I)[0])
    dropped = drop_text(prompt, layout)
    np.testing.assert_array_equal(dropped, np.concatenate([prompt[:bot], prompt[bot + len(WORDS) + 2:]]))
    assert not np.isin(dropped, [Special.BOT_I, Special.EOT_I]).any()
    no_text, _ = condition(Task.UNCONDITIONAL)
    with pytest.raises(ValueError, match="unconditional: this layout has no text to drop"):
        drop_text(prompt, no_text)


@pytest.mark.parametrize("cached", [True, False])
def test_forced_positions_are_taken_and_the_rest_sampled_as_if_sampled_after_them(model, cached):
    """Forcing the output ids that a sampler produced gives back the same sequence (the forced tokens enter the
    stream as sampled ones would), and the free positions after a forced prefix are the sampler's own."""
    run = generate if cached else generate_uncached
    layout, prompt = condition(Task.INPAINTING)
    free = run(model, layout, prompt, temperature=0.0)[0]
    out = free[layout.prefix_length:]
    assert np.array_equal(run(model, layout, prompt, temperature=0.0, forced=out)[0], free)
    other = out.copy()
    other[0] = VOCAB.video_offset + (out[0] - VOCAB.video_offset + 1) % VOCAB.video_codes  # another first code
    forced = np.full(len(out), -1)
    forced[0] = other[0]
    ids = run(model, layout, prompt, temperature=0.0, forced=forced)[0]
    assert ids[layout.prefix_length] == other[0]
    parse_sequence(ids, layout)  # still a whole sequence of the layout
    with pytest.raises(ValueError, match=r"forced: id 3 at output position 0 is outside its valid range"):
        run(model, layout, prompt, forced=np.array([3]))
    with pytest.raises(ValueError, match="forced: .* ids for an output of"):
        run(model, layout, prompt, forced=np.zeros(len(out) + 1, np.int64) + VOCAB.video_offset)


def test_generation_errors(model):
    layout, prompt = condition(Task.TEXT_TO_VIDEO)
    with pytest.raises(ValueError, match=r"text_to_video: prompt_ids hold 10 ids, the layout.s prefix has 11"):
        generate(model, layout, prompt[:-1])
    broken = prompt.copy()
    broken[3] = Special.EOS
    with pytest.raises(ValueError, match=r"prompt_ids\[0, 3\] = <eos> does not fit the layout \(text\)"):
        generate(model, layout, broken)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, layout, prompt, top_p=0)
    with pytest.raises(ValueError, match="uncond_prompt_ids must end with the prompt's <bov_o>"):
        generate(model, layout, prompt, uncond_prompt_ids=prompt[:-1])
    no_text, unconditional = condition(Task.UNCONDITIONAL)
    with pytest.raises(ValueError, match="no text to drop"):
        generate(model, no_text, unconditional, guidance=2.0)
    other = Layout(Task.TEXT_TO_VIDEO, Vocabulary(256, 2, 64, 33), VIDEO.shape, text_tokens=len(WORDS))
    with pytest.raises(ValueError, match="differs from the model's"):
        generate(model, other, prompt)
    text_layout, text_prompt = condition(Task.TEXT_TO_VIDEO, "embeddings")
    with pytest.raises(ValueError, match="placeholders but no text_embeddings"):
        generate(model, text_layout, text_prompt)
