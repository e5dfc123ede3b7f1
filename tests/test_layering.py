"""The package layering, read from the source's imports (module level and inside functions alike):

    pipeline/       the library: no ray, no deepspeed, mlflow only in pipeline/tracking.py
    cluster/        the shared Ray helpers: the library and ray, nothing of the apps
    tokenize_jobs/  Ray Data jobs: never train/, eval/ or apps/
    eval/           evaluation: never train/, tokenize_jobs/ or apps/
    train/          the training engine and apps: never tokenize_jobs/, eval/ or apps/; deepspeed only here
    apps/           the demo and generation: anything

and the library's shard reader works where ray, deepspeed and mlflow are not installed.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cluster", "tokenize_jobs", "eval", "train", "apps")
FORBIDDEN = {
    "pipeline": {"ray", "deepspeed", "mlflow", "cluster", "tokenize_jobs", "eval", "train", "apps"},
    "cluster": {"deepspeed", "mlflow", "tokenize_jobs", "eval", "train", "apps"},
    "tokenize_jobs": {"deepspeed", "eval", "train", "apps"},
    "eval": {"deepspeed", "tokenize_jobs", "train", "apps"},
    "train": {"tokenize_jobs", "eval", "apps"},
    "apps": {"deepspeed"},
}
ALLOWED = {("pipeline/tracking.py", "mlflow")}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for root in sorted(imported_roots(path) & FORBIDDEN[package]):
                if (name, root) not in ALLOWED:
                    found.append(f"{name} imports {root}")
    return found


def test_packages_import_only_downwards():
    assert violations() == []


def test_the_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.train\n    from deepspeed.utils import x\n")
    assert imported_roots(module) == {"ray", "deepspeed"}


BLOCKED = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "deepspeed", "mlflow", "open_clip", "torchvision", "datasets"}:
            raise ImportError(f"{name} is not installed")

sys.meta_path.insert(0, Block())
from pipeline.shards import open_shards
shards = open_shards(sys.argv[1])
print(shards.clips, shards.fingerprint)
"""


@pytest.mark.heavy
def test_shards_read_without_the_distributed_extras(shards):
    done = subprocess.run([sys.executable, "-c", BLOCKED, str(shards)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    clips, fingerprint = done.stdout.split()
    assert int(clips) > 0 and len(fingerprint) == 16
