"""One console script, one subcommand per stage; each stage also runs as a module."""
import subprocess
import sys

import pytest

from pipeline.cli import STAGES, main


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_unknown_stage_is_an_error(capsys):
    assert main(["fly"]) == 2
    assert "unknown stage 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_runs_as_a_module_with_help(stage):
    result = run("-m", f"pipeline.{stage}", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_user_errors_print_one_line_not_a_traceback(tmp_path):
    result = run("-m", "pipeline", "prepare", "--input", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
