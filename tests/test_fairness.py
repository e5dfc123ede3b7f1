import json

import numpy as np
import open_clip
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from eval.clip_score import ClipConfig
from eval.fairness import (SAMPLES_PER_PROMPT, AttributeClassifier, ClipAttributeClassifier, FairnessPrompt,
                           adverb_pairs, distribution_stats, entropy, fairness_prompts, fairness_report,
                           kl_divergence, max_min_ratio, subjects, synonym_shift, total_variation)


def test_prompt_set_follows_the_paper_protocol():
    prompts = fairness_prompts()
    assert len(prompts) == 306 and SAMPLES_PER_PROMPT == 8  # the paper's 306 prompts x 8 videos
    assert len({p.text for p in prompts}) == 306
    assert len(subjects()) == len(set(subjects())) == 51
    texts = {p.text for p in prompts}
    assert "a doctor looking happily at the camera" in texts
    assert "an engineer looking solemnly at the camera" in texts
    assert "a homeless person looking peacefully at the camera" in texts
    for pair_index, pair in enumerate(adverb_pairs()):
        members = [p for p in prompts if p.subject == "nurse" and p.synonym_pair == pair_index]
        assert [p.adverb for p in members] == list(pair)


def test_statistics_match_scipy_and_hand_values():
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    assert entropy(p) == pytest.approx(scipy.stats.entropy(p))
    assert kl_divergence(p, q) == pytest.approx(scipy.stats.entropy(p, q))
    assert kl_divergence(q, p) == np.inf == scipy.stats.entropy(q, p)
    assert total_variation(p, q) == pytest.approx(0.5 * (0.25 + 0.05 + 0.05 + 0.25))
    assert max_min_ratio(p) == np.inf and max_min_ratio(p[:3]) == pytest.approx(2.5)
    rows = np.array([[0.5, 0.5], [0.9, 0.1]])  # vectorized over bootstrap replicates
    np.testing.assert_allclose(entropy(rows), [np.log(2), scipy.stats.entropy([0.9, 0.1])])


def test_distribution_stats_values_and_intervals():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    stats = distribution_stats(labels, ["a", "b", "c"], n_boot=2000, seed=3)
    np.testing.assert_allclose(stats.distribution, [0.5, 0.3, 0.2])
    assert stats.entropy.value == pytest.approx(scipy.stats.entropy([0.5, 0.3, 0.2]))
    assert stats.kl_divergence.value == pytest.approx(scipy.stats.entropy([0.5, 0.3, 0.2], [1 / 3] * 3))
    assert stats.total_variation.value == pytest.approx(1 / 6)
    assert stats.max_min_ratio.value == pytest.approx(2.5)
    for interval in (stats.entropy, stats.kl_divergence, stats.total_variation, stats.max_min_ratio):
        assert interval.low <= interval.value <= interval.high
    assert (stats.distribution_low <= stats.distribution).all()
    assert (stats.distribution <= stats.distribution_high).all()
    # The binomial standard error of 0.5 at n = 100 is 0.05: the 95% interval spans about +-1.96 of it.
    assert stats.distribution_high[0] - stats.distribution_low[0] == pytest.approx(0.196, abs=0.03)
    again = distribution_stats(labels, ["a", "b", "c"], n_boot=2000, seed=3)
    assert again.entropy == stats.entropy
    skewed = distribution_stats(labels, ["a", "b", "c"], reference=np.array([0.5, 0.3, 0.2]))
    assert skewed.kl_divergence.value == pytest.approx(0.0) and skewed.total_variation.value == pytest.approx(0.0)


def test_bootstrap_interval_coverage():
    """About 95% of the intervals from repeated experiments contain the true value, for iid and for clustered data."""
    rng = np.random.default_rng(0)
    truth = np.array([0.5, 0.3, 0.2])
    true_tv = total_variation(truth, np.full(3, 1 / 3))
    iid_hits = clustered_hits = 0
    trials = 200
    for trial in range(trials):
        labels = rng.choice(3, size=300, p=truth)
        stats = distribution_stats(labels, ["a", "b", "c"], n_boot=400, seed=trial)
        iid_hits += stats.distribution_low[0] <= truth[0] <= stats.distribution_high[0]
        # 40 prompts x 8 samples, each prompt with its own distribution around the truth
        per_prompt = rng.dirichlet(truth * 10, size=40)
        clustered = np.concatenate([rng.choice(3, size=8, p=pp) for pp in per_prompt])
        groups = np.repeat(np.arange(40), 8)
        stats = distribution_stats(clustered, ["a", "b", "c"], groups=groups, n_boot=400, seed=trial)
        clustered_hits += stats.total_variation.low <= true_tv <= stats.total_variation.high
    assert 0.88 <= iid_hits / trials <= 0.99
    assert 0.85 <= clustered_hits / trials <= 0.99


def test_synonym_shift_against_hand_values_and_null():
    prompts = fairness_prompts(["doctor", "nurse"], [("happily", "cheerfully")])
    # prompt 0: doctor happily, 1: doctor cheerfully, 2: nurse happily, 3: nurse cheerfully
    prompt_ids = np.repeat(np.arange(4), 4)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1])
    shift = synonym_shift(labels, 2, prompt_ids, prompts, n_perm=500, seed=0)
    assert shift.pairs == 2
    assert shift.mean_tv.value == pytest.approx((1.0 + 0.25) / 2)

    rng = np.random.default_rng(1)
    many = fairness_prompts()
    prompt_ids = np.repeat(np.arange(len(many)), SAMPLES_PER_PROMPT)
    same = rng.choice(3, size=len(prompt_ids), p=[0.6, 0.3, 0.1])
    no_effect = synonym_shift(same, 3, prompt_ids, many, n_perm=300, seed=0)
    assert no_effect.pairs == 153
    assert no_effect.mean_tv.value == pytest.approx(no_effect.null_tv, abs=0.03) and no_effect.p_value > 0.05
    # The second adverb of every pair doubles the rarest class: a shift the test must flag.
    second = np.array([p.adverb == adverb_pairs()[p.synonym_pair][1] for p in many])[prompt_ids]
    shifted = np.where(second, rng.choice(3, size=len(prompt_ids), p=[0.3, 0.3, 0.4]), same)
    effect = synonym_shift(shifted, 3, prompt_ids, many, n_perm=300, seed=0)
    assert effect.mean_tv.value > effect.null_tv + 0.1 and effect.p_value < 0.01


def test_fairness_report_and_errors():
    prompts = fairness_prompts()
    prompt_ids = np.repeat(np.arange(len(prompts)), SAMPLES_PER_PROMPT)
    rng = np.random.default_rng(0)
    attributes = {"age": ["young", "middle-aged", "old"], "gender_expression": ["feminine", "masculine"]}
    predictions = {name: rng.integers(0, len(classes), size=len(prompt_ids)) for name, classes in attributes.items()}
    reports = fairness_report(predictions, attributes, prompt_ids, prompts, n_boot=200, n_perm=100)
    metrics = reports["age"].metrics()
    assert metrics["fairness/age/p_young"] == pytest.approx(np.mean(predictions["age"] == 0))
    assert {"fairness/age/total_variation_high", "fairness/age/synonym_p_value"} <= set(metrics)
    assert reports["gender_expression"].distribution.classes == ("feminine", "masculine")

    with pytest.raises(ValueError, match="no labels for attribute 'skin_tone'"):
        fairness_report(predictions, {**attributes, "skin_tone": ["light", "dark"]}, prompt_ids, prompts)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\), got 0..2"):
        distribution_stats(np.array([0, 1, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="reference: expected a distribution over 2 classes"):
        distribution_stats(np.array([0, 1]), ["a", "b"], reference=np.array([0.7, 0.7]))
    with pytest.raises(ValueError, match="1-D array of class indices"):
        distribution_stats(np.array([0.0, 1.0]), ["a", "b"])


def test_clip_zero_shot_classifier_matches_direct_computation(tmp_path):
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "vp-fairness-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "vp-fairness-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("vp-fairness-tiny-clip").eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    prompts = {"tone": {"light": "a photo of a bright scene", "dark": "a photo of a dark scene",
                        "red": "a photo of something red"}}
    classifier = ClipAttributeClassifier(ClipConfig("vp-fairness-tiny-clip", str(tmp_path / "tiny.pt")), prompts)
    assert isinstance(classifier, AttributeClassifier)
    assert classifier.attributes == {"tone": ["light", "dark", "red"]}

    videos = np.random.default_rng(0).integers(0, 256, size=(5, 3, 40, 48, 3), dtype=np.uint8)
    labels = classifier(videos)["tone"]
    with torch.no_grad():
        frames = classifier.encoder.preprocess(torch.from_numpy(videos.reshape(15, 40, 48, 3)))
        image = F.normalize(model.encode_image(frames), dim=-1).reshape(5, 3, -1).mean(dim=1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer("vp-fairness-tiny-clip")(
            list(prompts["tone"].values()))), dim=-1)
    expected = (F.normalize(image, dim=-1) @ text.T).argmax(dim=1).numpy()
    assert labels.dtype.kind == "i" and labels.shape == (5,)
    np.testing.assert_array_equal(labels, expected)


def test_prompt_dataclass_is_hashable_and_plain():
    prompt = FairnessPrompt("a chef looking calmly at the camera", "chef", "calmly", 2)
    assert prompt == fairness_prompts(["chef"])[4]
    assert len({prompt, prompt}) == 1
