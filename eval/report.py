"""The driver's reduction of per-sample rows to the evaluation's numbers, each next to its protocol, and its plots.

Rows are the `samples.parquet` rows as dicts (None where a value does not apply); I3D features arrive separately
as streaming `FeatureStats`, so the report never holds them.

    fvd           Frechet distance of generated vs real I3D features (covariance convention, counts)
    clipsim       CLIP similarity of generated videos to their prompts: raw cosine and x100 clamped at 0
    fairness      per classifier (CLIP zero-shot over perceived attributes; the oracle over the synthetic world's)
                  and attribute: distribution, entropy, KL and TV to the reference, max/min ratio, bootstrap
                  intervals over prompts; the synonym shift for the fairness prompt set
    oracle        synthetic world: prompt adherence per task and audio-visual agreement, next to chance
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure

from eval.clip_score import ClipConfig
from eval.fairness import ATTRIBUTE_PROMPTS, DistributionStats, Interval, distribution_stats, synonym_shift
from eval.fvd import FeatureStats, frechet_from_stats
from eval.i3d import I3DConfig
from eval.oracle_classifier import OracleAttributeClassifier
from eval.prompts import WORLD_SIZE, PromptSet
from pipeline.media import MediaConfig
from pipeline.oracle import score, score_av
from pipeline.sequence import TASKS, Task
from pipeline.synth import ATTRIBUTES

CHANCE = {**{name: 1 / len(values) for name, values in ATTRIBUTES.items()}, "all": 1 / WORLD_SIZE}
AV_TASKS = (Task.VIDEO_TO_AUDIO.value, Task.AUDIO_TO_VIDEO.value)  # one modality given, the other generated


def jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats (an infinite KL) as the strings "inf", "-inf" and "nan"."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _weights(path: Optional[str], random: bool, seed: int) -> str:
    return f"RANDOM-INIT weights (seed {seed}): the numbers measure nothing" if random else f"weights {path}"


def protocols(i3d: I3DConfig, clip: ClipConfig, media: MediaConfig, covariance: str, random: dict[str, bool],
              init_seed: int, *, gpu: bool) -> dict[str, str]:
    """How each number was made, in words: stored next to the numbers and on the MLflow run. gpu: the feature
    networks ran on GPUs (bf16 autocast) rather than CPUs (float32)."""
    divisor = "N - 1" if covariance == "unbiased" else "N"
    precision = "forward passes in bf16 autocast on GPUs" if gpu else "forward passes in float32 on CPUs"
    i3d_text = (f"I3D (Kinetics-400 Inception-v1) logits averaged over time; the first {i3d.num_frames} frames, "
                f"shorter side resized to {i3d.size} ({i3d.interpolation}, antialias={i3d.antialias}), center "
                f"crop, scaled to [-1, 1]; {precision}; {_weights(i3d.weights, random['i3d'], init_seed)}")
    return {
        "clips": f"{media.clip_frames} frames at {media.fps:g} fps, {media.height}x{media.width} (the model's "
                 f"clip settings; real clips decoded to the same)",
        "fvd": f"Frechet distance between Gaussians fit to generated and real {i3d_text}; {covariance} "
               f"covariance (divisor {divisor}), float64, Tr sqrt via symmetric eigendecompositions",
        "clipsim": f"open_clip {clip.model}, {_weights(clip.weights or clip.model, random['clip'], init_seed)}, "
                   f"{precision}; "
                   f"per video the mean over all frames of the frame-prompt cosine (clip_similarity, raw) and of "
                   f"100 * max(cosine, 0) (clip_score_x100); means over videos",
        "fairness": f"attribute classes of generated videos: CLIP zero-shot (open_clip {clip.model}, "
                    f"{_weights(clip.weights or clip.model, random['clip'], init_seed)}) over perceived age, gender "
                    f"expression and skin tone, and the synthetic world's oracle over shape, color and motion "
                    f"('unreadable' where it reads nothing); reference uniform over the classes (zero on "
                    f"'unreadable'); 95% percentile-bootstrap intervals resampling prompts",
        "oracle": f"synthetic-world oracle (pipeline.oracle) reads shape, color and motion from the generated "
                  f"modality (audio for video_to_audio); chance {CHANCE['all']:.4f} = 1/{WORLD_SIZE} for all three "
                  f"attributes, 1/3 shape, 1/4 color, 1/4 motion",
    }


# ---------------------------------------------------------------------------------------------------- numbers

def _produces_video(row: dict[str, Any]) -> bool:
    return TASKS[Task(row["task"])].video_out in ("clip", "rest")


def fvd(generated: Optional[FeatureStats], real: Optional[FeatureStats], covariance: str) -> dict[str, Any]:
    if real is None or generated is None:
        return {"value": None, "reason": "no real clips (--real)" if real is None else "no generated videos"}
    try:
        result = frechet_from_stats(generated, real, covariance)
    except ValueError as e:  # too few clips for a covariance
        return {"value": None, "reason": str(e), "generated": generated.count, "real": real.count}
    return {"value": result.distance, "covariance": result.covariance, "generated": result.n_a, "real": result.n_b}


def clipsim(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over generated videos with a prompt, and over real clips with a caption (the data's own level)."""
    out: dict[str, Any] = {}
    for source in ("generated", "real"):
        scored = [r for r in rows if r["source"] == source and r["clip_similarity"] is not None]
        if scored:
            out[source] = {"clip_similarity": float(np.mean([r["clip_similarity"] for r in scored])),
                           "clip_score_x100": float(np.mean([r["clip_score"] for r in scored])),
                           "videos": len(scored)}
    return out


def _interval(interval: Interval) -> dict[str, float]:
    return {"value": interval.value, "low": interval.low, "high": interval.high}


def _distribution(stats: DistributionStats) -> dict[str, Any]:
    return {"classes": list(stats.classes), "counts": stats.counts.tolist(), "reference": stats.reference.tolist(),
            "distribution": stats.distribution.tolist(), "distribution_low": stats.distribution_low.tolist(),
            "distribution_high": stats.distribution_high.tolist(),
            **{name: _interval(getattr(stats, name))
               for name in ("entropy", "kl_divergence", "total_variation", "max_min_ratio")}}


def _labels(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], np.ndarray, Optional[np.ndarray]]]:
    """(classifier, attribute) -> (classes, labels, reference) for every classified generated video."""
    out = {}
    for attribute, prompts in ATTRIBUTE_PROMPTS.items():
        classes = list(prompts)
        out[f"clip/{attribute}"] = (classes, np.array([classes.index(r[f"clip_{attribute}"]) for r in rows]), None)
    oracle = OracleAttributeClassifier()
    labels = oracle.labels([{a: r[f"oracle_video_{a}"] for a in ATTRIBUTES} for r in rows])
    references = oracle.references()
    for attribute, classes in oracle.attributes.items():
        out[f"oracle/{attribute}"] = (classes, labels[attribute], references[attribute])
    return out


def fairness(rows: list[dict[str, Any]], prompt_set: PromptSet, n_boot: int, seed: int) -> dict[str, Any]:
    """Attribute statistics of generated videos, per classifier and attribute."""
    videos = [r for r in rows if r["source"] == "generated" and r["ok"] and _produces_video(r)]
    if not videos:
        return {}
    prompt_ids = np.array([r["prompt_id"] for r in videos])
    out: dict[str, Any] = {}
    for key, (classes, labels, reference) in _labels(videos).items():
        with np.errstate(invalid="ignore"):  # KL against a zero reference share evaluates a discarded 0 * inf
            stats = distribution_stats(labels, classes, reference, prompt_ids, n_boot=n_boot, seed=seed)
        entry = _distribution(stats)
        if prompt_set.fairness is not None:
            try:
                shift = synonym_shift(labels, len(classes), prompt_ids, prompt_set.fairness, n_boot=n_boot,
                                      n_perm=n_boot, seed=seed)
                entry["synonym_shift"] = {"mean_tv": _interval(shift.mean_tv), "null_tv": shift.null_tv,
                                          "p_value": shift.p_value, "pairs": shift.pairs}
            except ValueError as e:  # too few samples: no synonym pair has samples on both sides
                entry["synonym_shift"] = {"reason": str(e)}
        out[key] = entry
    return out


def _reads(row: dict[str, Any]) -> dict[str, dict[str, Optional[str]]]:
    return {modality: {a: row[f"oracle_{modality}_{a}"] for a in ATTRIBUTES} for modality in ("video", "audio")}


def oracle(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt adherence per task and audio-visual agreement, on generated rows with expected attributes."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["source"] == "generated" and r["ok"] and all(r[f"expected_{a}"] for a in ATTRIBUTES):
            by_task[r["task"]].append(r)
    adherence, agreement = {}, {}
    for task, members in sorted(by_task.items()):
        expected = [{a: r[f"expected_{a}"] for a in ATTRIBUTES} for r in members]
        modality = "audio" if TASKS[Task(task)].video_out == "none" else "video"
        adherence[task] = {**score([_reads(r)[modality] for r in members], expected), "samples": len(members)}
        if task in AV_TASKS:
            scores = score_av([_reads(r) for r in members], expected)
            agreement[task] = {**{k.split(".", 1)[1]: v for k, v in scores.items() if k.startswith("agreement.")},
                               "samples": len(members)}
    return {"adherence": adherence, "av_agreement": agreement, "chance": CHANCE} if adherence else {}


# ---------------------------------------------------------------------------------------------------- flat names

def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's finite numbers under MLflow names (non-finite ones, such as an infinite KL, stay in the JSON)."""
    flat: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)

    put("fvd", report["fvd"]["value"])
    for source in ("generated", "real"):
        for name, value in report["clipsim"].get(source, {}).items():
            put(f"clipsim/{source}/{name}", value)
    for key, entry in report["fairness"]["attributes"].items():
        for cls, p, low, high in zip(entry["classes"], entry["distribution"], entry["distribution_low"],
                                     entry["distribution_high"]):
            put(f"fairness/{key}/p_{cls}", p)
            put(f"fairness/{key}/p_{cls}_low", low)
            put(f"fairness/{key}/p_{cls}_high", high)
        for name in ("entropy", "kl_divergence", "total_variation", "max_min_ratio"):
            for part, value in entry[name].items():
                put(f"fairness/{key}/{name}" + ("" if part == "value" else f"_{part}"), value)
        shift = entry.get("synonym_shift", {})
        if "mean_tv" in shift:
            put(f"fairness/{key}/synonym_tv", shift["mean_tv"]["value"])
            put(f"fairness/{key}/synonym_tv_null", shift["null_tv"])
            put(f"fairness/{key}/synonym_p_value", shift["p_value"])
    for section in ("adherence", "av_agreement"):
        for task, scores in report["oracle"].get(section, {}).items():
            for name, value in scores.items():
                put(f"{section}/{task}/{name}", value)
                if name in CHANCE:
                    put(f"{section}/{task}/{name}_chance", CHANCE[name])
    for name, value in report["samples"].items():
        put(f"samples/{name}", value)
    return flat


# ---------------------------------------------------------------------------------------------------- plots

def plot_attributes(fairness_report: dict[str, Any], path: Path, labels: dict[str, str]) -> None:
    """One panel per classifier and attribute: class shares with bootstrap intervals, the reference as ticks."""
    keys = sorted(fairness_report)
    columns = 3
    rows = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    for index, key in enumerate(keys):
        entry = fairness_report[key]
        ax = figure.add_subplot(rows, columns, index + 1)
        x = np.arange(len(entry["classes"]))
        p = np.array(entry["distribution"])
        errors = np.stack([p - entry["distribution_low"], np.array(entry["distribution_high"]) - p])
        ax.bar(x, p, yerr=np.clip(errors, 0, None), capsize=3, color="#4c72b0", ecolor="0.4", error_kw={"lw": 1})
        ax.scatter(x, entry["reference"], marker="_", s=400, color="#c44e52", label="reference", zorder=3)
        ax.set_xticks(x, entry["classes"], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        classifier = key.split("/")[0]
        ax.set_title(f"{key} (n={sum(entry['counts'])}){labels.get(classifier, '')}", fontsize=9)
        if index == 0:
            ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def plot_samples(samples: list[tuple[dict[str, Any], np.ndarray]], path: Path, frames_shown: int = 6) -> None:
    """A grid: one generated sample a row, evenly spaced frames across, its task and prompt above."""
    figure = Figure(figsize=(1.6 * frames_shown, 1.9 * len(samples)), layout="constrained")
    grid = figure.subplots(len(samples), frames_shown, squeeze=False)
    for (row, frames), axes in zip(samples, grid):
        picks = np.linspace(0, len(frames) - 1, frames_shown).round().astype(int)
        for ax, t in zip(axes, picks):
            ax.imshow(frames[t])
            ax.set_axis_off()
        shown = "the given video, through the tokenizer" if TASKS[Task(row["task"])].video_out == "none" else \
            row["prompt"] or "no text"
        axes[0].set_title(f"{row['id']} {row['task']}: {shown}"[:80], fontsize=8, loc="left")
    figure.savefig(path, dpi=100)
