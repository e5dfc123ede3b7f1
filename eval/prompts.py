"""What the evaluation stage generates: prompt sets and the sample rows they expand to.

A prompt set comes from a file or is built in:

- a JSONL file (`.jsonl`): one object a line, {"task", "prompt", "attributes", "video"}, all but `task` optional.
  `attributes` ({"shape", "color", "motion"} of the synthetic world) are what the oracle checks the sample against;
  `video` is a file whose first clip (frames and audio) conditions the task.
- any other file: one text-to-video prompt a line (blank lines skipped).
- `fairness`: the paper's 306 fairness prompts, 8 samples each.
- `synthetic`: every caption of the synthetic world (all 48 attribute combinations, in the balanced order of
  `attribute_schedule`, so any prefix is balanced), once per task of `tasks`. Text-to-X tasks get the caption; tasks
  conditioned on video or audio get no text, only the world's clip of those attributes, so the sample shows what the
  model reads from the other modality (audio-visual agreement).

A task conditioned on video or audio needs a `video` or `attributes` (rendered by the synthetic world at the model's
clip settings); a prompt that has neither is an error naming its line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from eval.fairness import SAMPLES_PER_PROMPT, FairnessPrompt, fairness_prompts
from pipeline.media import MediaConfig
from pipeline.sequence import TASKS, Task
from pipeline.storage import is_uri
from pipeline.synth import ATTRIBUTES, SynthConfig, attribute_schedule, caption, plan, render_audio, render_video

BUILT_IN = ("fairness", "synthetic")
# The columns of a sample row (and of a real clip's row, which has the same): what the workers receive.
ROW_COLUMNS = ("id", "source", "prompt_id", "task", "prompt", "seed", "path",
               *(f"expected_{a}" for a in ATTRIBUTES), "keep_media")
WORLD_SIZE = int(np.prod([len(values) for values in ATTRIBUTES.values()]))  # 48 combinations


@dataclass(frozen=True)
class Prompt:
    task: str
    text: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    video: str = ""  # a file whose first clip conditions the task


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[Prompt]
    repeats: int  # samples per prompt
    fairness: Optional[list[FairnessPrompt]] = None  # the fairness protocol's prompts, aligned with `prompts`


def needs_condition(task: str) -> bool:
    spec = TASKS[Task(task)]
    return spec.video_in != "none" or spec.audio_in != "none"


def _check(prompt: Prompt, where: str) -> Prompt:
    tasks = [t.value for t in Task]
    if prompt.task not in tasks:
        raise ValueError(f"{where}: task {prompt.task!r} is not one of {tasks}")
    spec = TASKS[Task(prompt.task)]
    if spec.text == "required" and not prompt.text.strip():
        raise ValueError(f"{where}: {prompt.task} needs a non-empty prompt")
    for name, value in prompt.attributes.items():
        if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
            raise ValueError(f"{where}: attribute {name}={value!r} is not one of the synthetic world's "
                             f"{ {k: list(v) for k, v in ATTRIBUTES.items()} }")
    if needs_condition(prompt.task) and not prompt.video and set(prompt.attributes) != set(ATTRIBUTES):
        raise ValueError(f"{where}: {prompt.task} is conditioned on video or audio: give a \"video\" file or all "
                         f"three \"attributes\" (the synthetic world renders the clip)")
    return prompt


def _read_jsonl(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"prompts {path}:{number}"
        try:
            item: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        unknown = sorted(set(item) - {"task", "prompt", "attributes", "video"}) if isinstance(item, dict) else []
        if not isinstance(item, dict) or "task" not in item or unknown:
            raise ValueError(f"{where}: expected an object with \"task\" and optional \"prompt\", \"attributes\", "
                             f"\"video\", got {line.strip()[:80]!r}")
        video = str(item.get("video") or "")
        if video and not Path(video).is_absolute() and not is_uri(video):
            video = str(path.parent / video)
        prompts.append(_check(Prompt(str(item["task"]), str(item.get("prompt") or ""),
                                     dict(item.get("attributes") or {}), video), where))
    return prompts


def synthetic_prompts(tasks: tuple[str, ...]) -> list[Prompt]:
    """Each of the world's 48 captions once per task, caption-major (a prefix covers every task)."""
    prompts = []
    for attributes in attribute_schedule(0, WORLD_SIZE):
        for task in tasks:
            text = caption(attributes) if TASKS[Task(task)].text != "none" and not needs_condition(task) else ""
            prompts.append(_check(Prompt(task, text, attributes), f"synthetic prompts ({task})"))
    return prompts


def load_prompts(source: str, samples_per_prompt: int, synthetic_tasks: tuple[str, ...]) -> PromptSet:
    """A built-in prompt set by name, or a prompts file."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if source == "fairness":
        protocol = fairness_prompts()
        return PromptSet("fairness", [Prompt(Task.TEXT_TO_VIDEO.value, p.text) for p in protocol],
                         SAMPLES_PER_PROMPT, protocol)
    if source == "synthetic":
        return PromptSet("synthetic", synthetic_prompts(synthetic_tasks), samples_per_prompt)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {source}: no such file (or one of the built-in sets {list(BUILT_IN)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts {path}: not UTF-8 text ({e})") from None
    if path.suffix == ".jsonl":
        prompts = _read_jsonl(path, text)
    else:
        prompts = [_check(Prompt(Task.TEXT_TO_VIDEO.value, line.strip()), f"prompts {path}:{number}")
                   for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise ValueError(f"prompts {path}: no prompts in the file")
    return PromptSet(path.name, prompts, samples_per_prompt)


def sample_rows(prompt_set: PromptSet, max_samples: int, seed: int, media_samples: int) -> list[dict[str, Any]]:
    """One row per sample: each prompt `repeats` times, the first `max_samples` (0: all). Sample i is drawn with
    seed + i; the first `media_samples` keep their frames for the MP4s and the frame grid."""
    rows = []
    for prompt_id, prompt in enumerate(prompt_set.prompts):
        for _ in range(prompt_set.repeats):
            i = len(rows)
            rows.append({"id": f"gen-{i:06d}", "source": "generated", "prompt_id": prompt_id, "task": prompt.task,
                         "prompt": prompt.text, "seed": seed + i, "path": prompt.video,
                         **{f"expected_{a}": prompt.attributes.get(a, "") for a in ATTRIBUTES},
                         "keep_media": i < media_samples})
            if len(rows) == max_samples:
                return rows
    return rows


def render_condition(attributes: dict[str, str], media: MediaConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic world's clip of these attributes at the model's clip settings: frames (T, H, W, 3), audio.

    Nuisances (size, position, loudness, phases) follow `seed`; the attributes are those asked for (every
    combination occurs once among the world's first 48 clips of any seed).
    """
    cfg = SynthConfig(width=media.width, height=media.height, fps=round(media.fps), frames=media.clip_frames,
                      sample_rate=media.sample_rate)
    spec = next(s for s in plan(cfg, seed, WORLD_SIZE) if s.attributes == attributes)
    audio = render_audio(spec, cfg)
    return render_video(spec, cfg), np.pad(audio, (0, max(0, media.clip_samples - len(audio))))
