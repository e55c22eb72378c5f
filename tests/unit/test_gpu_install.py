"""GPU installs resolve: this project's pins against the CUDA build of the pinned torch, as PyPI serves it.

CI installs torch's CPU wheel, which requires no triton; the CUDA wheel that `pip install torch==<pin>`
gets on Linux x86-64 requires triton==3.7.1 and CUDA 13 libraries. A pin that only the CPU wheel
tolerates (the dev extra's triton==3.6.0 was one: `make venv` failed with ResolutionImpossible on every
CUDA machine) passes unnoticed there. These tests read the METADATA of that very wheel from PyPI (with
HTTP range requests: a few kB of a ~500 MB file) and

1. check every tested version in constraints.txt (what the Makefile and the images install with
   pyproject.toml's ranges) against its requirements, and that each lies in pyproject.toml's range;
2. resolve the whole project (dependencies + dev + gpu extras, with constraints.txt) with pip's resolver for
   Linux x86-64 and this Python, torch's CUDA requirements in place of the CPU wheel's (a stand-in wheel
   ``torch-<pin>+cu<NNN>`` carrying the CUDA wheel's Requires-Dist; the CUDA library wheels themselves,
   nvidia-* and cuda-toolkit, are left out: about 3 GB to fetch, and test 1 checks that no pin names one);
3. check the CUDA version the project states for that wheel (doctor.PYPI_TORCH_CUDA, the GPU image's
   NVIDIA_REQUIRE_CUDA).

They need PyPI (CI has it); pip runs with this machine's own configuration (its indexes and mirrors).
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
PYPI_SIMPLE = "https://pypi.org/simple"
PLATFORM = "manylinux_2_28_x86_64"   # the tag of torch's Linux x86-64 wheels on PyPI
PY = f"{sys.version_info.major}{sys.version_info.minor}"
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
         "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
         "python_full_version": ".".join(map(str, sys.version_info[:3])), "implementation_name": "cpython",
         "platform_python_implementation": "CPython"}
CUDA_LIBRARIES = re.compile(r"^(nvidia-|cuda-toolkit$)")

pytestmark = pytest.mark.timeout(300)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the dependencies and every extra, as a Linux x86-64 install sees them."""
    p = _project()
    out = [("dependencies", Requirement(r)) for r in p["dependencies"]]
    out += [(f"[{extra}]", Requirement(r)) for extra, reqs in p["optional-dependencies"].items() for r in reqs]
    return [(w, r) for w, r in out if r.marker is None or r.marker.evaluate(LINUX)]


def constraints() -> dict[str, str]:
    """{name: version} from constraints.txt (the versions tested together)."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            out[r.name.lower().replace("_", "-")] = str(r.specifier)[2:]
    return out


def pin(name: str) -> str:
    return constraints()[name.lower().replace("_", "-")]


class _RangeReader(io.RawIOBase):
    """A remote file read with HTTP range requests: zipfile needs only its end and one member."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buf) -> int:
        if self.pos >= self.size or not len(buf):
            return 0
        end = min(self.size, self.pos + len(buf)) - 1
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = r.read()
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


@lru_cache(maxsize=None)
def cuda_wheel_metadata() -> str:
    """METADATA of PyPI's torch==<pin> wheel for Linux x86-64 and this Python (the CUDA build)."""
    version = pin("torch")
    name = f"torch-{version}-cp{PY}-cp{PY}-{PLATFORM}.whl"
    req = urllib.request.Request(f"{PYPI_SIMPLE}/torch/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    url = next((f["url"] for f in files if f["filename"] == name), None)
    assert url, f"{name} is not on {PYPI_SIMPLE}/torch/"
    with zipfile.ZipFile(io.BufferedReader(_RangeReader(url), buffer_size=1 << 16)) as z:
        member = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(member).decode()


def cuda_wheel_requirements() -> list[Requirement]:
    reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in cuda_wheel_metadata().splitlines()
            if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({**LINUX, "extra": ""})]


def wheel_cuda() -> str:
    """The CUDA version the wheel is built for, from its cuda-toolkit requirement (major.minor)."""
    toolkit = next(r for r in cuda_wheel_requirements() if r.name == "cuda-toolkit")
    return ".".join(str(toolkit.specifier)[2:].split(".")[:2])


def test_pins_agree_with_the_cuda_wheel_of_torch() -> None:
    torch_reqs = {r.name: r for r in cuda_wheel_requirements()}
    assert any(CUDA_LIBRARIES.match(n) for n in torch_reqs), "expected the CUDA build of torch, got another wheel"
    conflicts = []
    tested = constraints()
    for name, version in tested.items():
        want = torch_reqs.get(name)
        assert not CUDA_LIBRARIES.match(name), f"{name}: a CUDA library pinned here; test 2 leaves those out"
        if want is not None and not want.specifier.contains(Version(version), prereleases=True):
            conflicts.append(f"constraints.txt pins {name}=={version}, but PyPI's torch=={pin('torch')} "
                             f"(the CUDA build GPU users install) requires {want}: pin {want.name}{want.specifier}")
    for where, r in project_requirements():
        version = tested.get(r.name.lower().replace("_", "-"))
        if r.name != "domain-adapters":
            assert version, f"pyproject.toml {where}: {r.name} has no tested version in constraints.txt"
            if not r.specifier.contains(Version(version), prereleases=True):
                conflicts.append(f"constraints.txt's {r.name}=={version} is outside pyproject.toml {where}'s {r}")
    assert not conflicts, "\n".join(conflicts)


def test_stated_cuda_is_the_wheels() -> None:
    from pipeline.doctor import PYPI_TORCH_CUDA
    assert wheel_cuda() == PYPI_TORCH_CUDA, f"PyPI's torch is built for CUDA {wheel_cuda()}: update doctor.PYPI_TORCH_CUDA"
    assert f'ARG REQUIRE_CUDA="cuda>={PYPI_TORCH_CUDA}"' in (ROOT / "containers/Dockerfile").read_text()


def _stand_in_torch(tmp_path: Path) -> tuple[Path, str]:
    """A wheel with the CUDA build's name and requirements (minus the CUDA library wheels), nothing else."""
    cu = "cu" + wheel_cuda().replace(".", "")
    version = f"{pin('torch')}+{cu}"
    keep = [ln for ln in cuda_wheel_metadata().splitlines()
            if ln.startswith(("Metadata-Version:", "Requires-Python:", "Provides-Extra:"))
            or (ln.startswith("Requires-Dist:") and not CUDA_LIBRARIES.match(Requirement(ln.split(":", 1)[1]).name))]
    dist = f"torch-{version}.dist-info"
    wheel = tmp_path / f"torch-{version}-cp{PY}-cp{PY}-{PLATFORM}.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{dist}/METADATA", "\n".join(["Metadata-Version: 2.1", "Name: torch", f"Version: {version}"]
                                                   + [k for k in keep if not k.startswith("Metadata-Version")]) + "\n")
        z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: cp{PY}-cp{PY}-{PLATFORM}\n")
        z.writestr(f"{dist}/RECORD", "")
    return tmp_path, version


# lm-eval's dependencies that PyPI has as source archives only: a resolve for another platform takes wheels
# only (--platform needs --only-binary=:all:), so they are built here, at their pins, into pure-Python wheels
# (what pip builds from them on any machine).
SDIST_ONLY = ("rouge-score", "sqlitedict", "word2number")


def _built_wheels(links: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary=:all:", "-w", str(links),
                        *(f"{n}=={pin(n)}" for n in SDIST_ONLY)], capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    built = sorted(w.name for w in links.glob("*.whl") if not w.name.startswith("torch-"))
    assert len(built) == len(SDIST_ONLY) and all(w.endswith("-py3-none-any.whl") for w in built), built


@pytest.mark.slow
def test_project_resolves_with_the_cuda_wheel_of_torch(tmp_path: Path) -> None:
    """pip's own resolver, for Linux x86-64: dependencies + every extra with the CUDA build's requirements."""
    links, version = _stand_in_torch(tmp_path)
    _built_wheels(links)
    reqs = [str(r) for _, r in project_requirements() if r.name not in ("torch", "domain-adapters")] + [f"torch=={version}"]
    platforms = [a for m in range(28, 16, -1) for a in ("--platform", f"manylinux_2_{m}_x86_64")]
    platforms += ["--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(tmp_path / "report.json"), "--use-feature=fast-deps", "--only-binary=:all:",
                        *platforms, "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
                        "--find-links", str(links), "-c", str(ROOT / "constraints.txt"), *reqs], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, f"the project does not resolve with torch's CUDA requirements:\n{r.stderr[-4000:]}"
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
              for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert chosen["torch"] == version
    triton = next(r for r in cuda_wheel_requirements() if r.name == "triton")
    assert triton.specifier.contains(chosen["triton"]), chosen["triton"]
