"""The package's layering (pyproject.toml, [tool.importlinter]): commands -> engine -> library -> rows/errors.

A library module that imports the engine, or the engine that imports a command (Hydra, the CLI), breaks
the contract; import-linter follows indirect imports too.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_imports_point_one_way() -> None:
    lint = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    proc = subprocess.run(lint, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout
