"""No config field is accepted without effect: every field of every config dataclass an app loads is read somewhere in
the code besides its own validation. A field that nothing reads is a setting that silently does nothing.

"Read" is an attribute access `something.<field>` (or `getattr(x, "<field>")`) outside the `__post_init__` that
validates it, in the module that defines the config class or in a module that imports the class by name: the code
that knows the class is the code that can act on it (a generic name such as `enabled` read elsewhere does not count).
That is necessary, not sufficient, for an effect; the apps' own tests check what the settings do.
"""

import ast
import dataclasses
import json
import typing
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cluster", "tokenize_jobs", "train", "eval", "apps")


def app_configs() -> list[type]:
    from apps.demo import DemoConfig
    from eval.stage import EvalConfig
    from tokenize_jobs.job import TokenizeConfig
    from train.llm import LLMTrainConfig
    from train.superres import SRTrainConfig
    from train.tokenizers import AudioTokenizerTrainConfig, VideoTokenizerTrainConfig

    return [DemoConfig, EvalConfig, TokenizeConfig, LLMTrainConfig, SRTrainConfig, VideoTokenizerTrainConfig,
            AudioTokenizerTrainConfig]


def config_classes() -> set[type]:
    """Every dataclass reachable from the apps' configs through their fields."""
    found: set[type] = set()
    todo = app_configs()
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        for hint in typing.get_type_hints(cls).values():
            for tp in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                    todo.append(tp)
    return found


# Modules that read configs of classes they never name: the training engine takes any app's config and reads its
# `train`, `deepspeed` and `tracking` sections.
GENERIC = {"train.engine": {"LLMTrainConfig", "SRTrainConfig", "VideoTokenizerTrainConfig",
                            "AudioTokenizerTrainConfig"}}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def scan() -> dict[str, tuple[set[str], set[str]]]:
    """module -> (names it imports from other modules, attribute names it reads outside `__post_init__` bodies)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            skipped = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__post_init__"
                       for n in ast.walk(f)}
            imported, read = set(), set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    imported.update(alias.name for alias in node.names)
                if id(node) in skipped:
                    continue
                if isinstance(node, ast.Attribute):
                    read.add(node.attr)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                      and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                    read.add(node.args[1].value)
            modules[module_name(path)] = (imported, read)
    return modules


def unread_fields(classes, modules) -> list[str]:
    unread = []
    for cls in classes:
        knowing = [read for name, (imported, read) in modules.items()
                   if name == cls.__module__ or cls.__name__ in imported | GENERIC.get(name, set())]
        for field in dataclasses.fields(cls):
            if not any(field.name in read for read in knowing):
                unread.append(f"{cls.__module__}.{cls.__name__}.{field.name}")
    return sorted(unread)


def test_every_config_field_is_read():
    unread = unread_fields(config_classes(), scan())
    assert unread == [], f"config fields that no code reads (settings without effect): {unread}"


def test_the_check_finds_an_unread_field():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        enabled: bool = False  # a name read all over the code, but by none that knows this class

    Settings.__module__ = "tests.nowhere"
    assert unread_fields([Settings], scan()) == ["tests.nowhere.Settings.enabled"]


def leaves(data: dict, prefix: str = ""):
    for name, value in data.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def bad_values(value) -> list:
    """Values no field of that default's type accepts: a wrong type, and for numbers a negative and a NaN."""
    if isinstance(value, bool):
        return ["yes"]
    if isinstance(value, int):
        return [-1, "7"]
    if isinstance(value, float):
        return [-1.0, float("nan"), float("inf"), "0.5"]
    if isinstance(value, str):
        return [3]
    return []


def replaced(data: dict, key: str, value) -> dict:
    data = json.loads(json.dumps(data))
    node = data
    *sections, name = key.split(".")
    for section in sections:
        node = node[section]
    node[name] = value
    return data


def test_every_field_of_every_config_refuses_bad_values_at_load():
    """Each app config (the demo's covers every stage), each field: a wrong type, a negative number, NaN or infinity
    is refused when the config is loaded, before any work, by an error that names the field."""
    from pipeline.config import ConfigError, from_dict, to_dict

    checked, unnamed, accepted = 0, [], []
    for cls in app_configs():
        base = to_dict(cls())
        for key, value in leaves(base):
            for bad in bad_values(value):
                try:
                    from_dict(cls, replaced(base, key, bad))
                    accepted.append(f"{cls.__name__} {key}={bad!r}")
                except ConfigError as e:
                    if key.split(".")[-1] not in str(e) and str(bad) not in str(e):
                        unnamed.append(f"{cls.__name__} {key}={bad!r}: {e}")
                checked += 1
    assert not accepted and not unnamed, "\n".join(accepted + unnamed)
    assert checked > 1000
