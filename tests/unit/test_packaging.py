"""The package builds and installs without warnings (issue 26: `make demo` printed setuptools' banner).

An editable install (what the Makefile does) and a wheel (what the images do) into a fresh venv, with
pip's own configuration; the build backend's output must carry no warning banner, and the wheel holds
the two packages only. Needs PyPI or its mirror for the isolated build's setuptools (CI has it)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BACKEND_WARNINGS = ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "SetuptoolsWarning", "!!")

pytestmark = pytest.mark.slow


def _backend_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(w in line for w in BACKEND_WARNINGS)]


def test_editable_install_and_wheel_build_without_warnings(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = [str(tmp_path / "venv" / "bin" / "python"), "-m", "pip"]
    # as the Makefile does: a current pip shows the build backend's warnings (the venv's bundled one hides them)
    subprocess.run([*pip, "install", "-q", "--upgrade", "pip"], check=True, capture_output=True, timeout=600)
    r = subprocess.run([*pip, "install", "--no-deps", "-e", str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not _backend_warnings(r.stdout + r.stderr), r.stdout + r.stderr
    probe = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import pipeline, jobs; print(pipeline.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == str(ROOT / "pipeline" / "__init__.py"), probe.stderr
    r = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and not _backend_warnings(r.stdout + r.stderr), r.stdout + r.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if "dist-info" not in n}
    assert tops == {"pipeline", "jobs"}
