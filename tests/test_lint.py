"""The tree passes the linter, and no comment cites a document outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

RUFF = Path(sys.executable).with_name("ruff")


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [name for name in out.stdout.splitlines() if (REPO / name).is_file()]


def test_ruff_passes():
    """pyflakes, pycodestyle at 120 columns and import order (``[tool.ruff]`` in pyproject.toml)."""
    proc = subprocess.run([str(RUFF), "check", "--no-cache", *_tracked("*.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]


def test_no_reference_outside_the_repository():
    """Facts are cited from docs/ARCHITECTURE.md; the design notes they came from are not part of the project."""
    outside = re.compile(r"(?<![\w/])DESIGN\.md|\.\./shared|shared/seed[s]")
    hits = [f"{name}:{n}" for name in _tracked("*.py", "*.md", "*.yml", "*.yaml", "*.service", "*.sh", "*.toml", "*.j2")
            for n, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert hits == []
