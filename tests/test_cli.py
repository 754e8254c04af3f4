from __future__ import annotations

import subprocess
import sys

import sparseseg
from sparseseg.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert sparseseg.__version__ in capsys.readouterr().out


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_console_module_runs():
    out = subprocess.run([sys.executable, "-m", "sparseseg", "--help"], capture_output=True, text=True, check=True)
    assert "sparseseg" in out.stdout
