import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from apps.cli import demo_parser, generate_parser
from eval.cli import eval_parser
from pipeline.cli import COMMANDS, main
from tokenize_jobs.cli import shards_parser, tokenize_parser
from train.cli import TARGETS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow", "deepspeed", "open_clip")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    assert exit_code([name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


COMMAND_LINES = [["demo", "--help"], ["tokenize", "--help"], ["shards", "info", "--help"], ["eval", "--help"],
                 ["generate", "--help"], *[["train", target, "--help"] for target in TARGETS],
                 ["train", "llm", "--out", "x"], ["generate", "--task", "nope"], ["eval", "--samples", "many"]]


def test_help_and_bad_arguments_answer_before_the_heavy_imports():
    """`--help` and an argument error come from the command's parser alone: no torch, Ray, MLflow or DeepSpeed is
    imported (they take seconds), so both answer at once."""
    script = ("import sys\nfrom pipeline.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    for argv in COMMAND_LINES:
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=ROOT)
        assert done.stderr.strip().splitlines()[-1] == "[]", (argv, done.stderr[-500:])


def parser_of(tokens: list[str]):
    """The parser of a `videopoet ...` command line, and the arguments it gets."""
    name, rest = tokens[1], tokens[2:]
    parsers = {"demo": demo_parser, "generate": generate_parser, "eval": eval_parser, "tokenize": tokenize_parser,
               "shards": shards_parser}
    if name == "train":
        return TARGETS[rest[0]][1](), rest[1:]
    return parsers[name](), rest


def example_lines() -> list[str]:
    """Every example command of the help texts and the README: lines that start with `videopoet COMMAND --`,
    continuations joined, less synopses (`[...]`) and elisions (`...` as an argument)."""
    texts = [p().format_help() for p in (demo_parser, generate_parser, eval_parser, tokenize_parser)]
    texts += [parser().format_help() for _, parser, _ in TARGETS.values()]
    texts.append((ROOT / "README.md").read_text())
    found = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            tokens = line.split()
            if (len(tokens) > 2 and tokens[0] == "videopoet" and tokens[1] in COMMANDS and "--" in line
                    and "[" not in line and "..." not in tokens):
                found.append(line)
    return found


def test_help_and_readme_examples_parse():
    examples = example_lines()
    assert len(examples) >= 12 and any(e.startswith("videopoet generate") for e in examples)
    for example in examples:
        parser, args = parser_of(shlex.split(example))
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"the example does not parse: {example}")


def test_console_script_and_python_m():
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "videopoet"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in out
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "synth", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--clips" in out


def test_quiet_turns_off_every_training_stage_progress():
    from apps.demo import TRAINING_STAGES, demo_config

    loud = demo_config(demo_parser().parse_args(["--out", "x"]))
    quiet = demo_config(demo_parser().parse_args(["--out", "x", "--quiet", "--set", "llm.train.steps=5"]))
    assert all(getattr(loud, s).train.progress for s in TRAINING_STAGES)
    assert not any(getattr(quiet, s).train.progress for s in TRAINING_STAGES)
    assert quiet.llm.train.steps == 5
