"""The documentation: the mkdocs site builds with --strict (no broken link, anchor or nav entry), and the
README's relative links point to files that exist."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Pages the README links to before a run generates them (`sftlens report ... --page PAGE`).
PENDING: set[str] = set()  # pages linked before their run exists


def test_site_builds_strict(tmp_path):
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (the docs extra: pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    targets = {m.group(1).split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text)}
    local = {t for t in targets if t and "://" not in t}
    assert local, "the README links to no file"
    broken = sorted(t for t in local if t not in PENDING and not (ROOT / t).exists())
    assert not broken, f"README links to missing files: {broken}"
