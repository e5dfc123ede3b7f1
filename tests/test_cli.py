import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    try:
        code = main([name, "--help"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_and_python_m():
    bindir = __import__("pathlib").Path(sys.executable).parent
    out = subprocess.run([str(bindir / "videopoet"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in out
    module = COMMANDS["synth"][0]
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--clips" in out
