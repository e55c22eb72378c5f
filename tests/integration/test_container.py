"""The CPU image, built and run: `containers/Dockerfile.cpu` builds with podman, the demo runs inside it
as the image's non-root user, and a Ray head inside it takes the demo as a job from `jobs/submit.py`.

No image registry is reachable here, so the base is a local stand-in for Ray's image
(containers/local-base.sh: Debian bookworm's Python 3.11, user ray 1000:100, a venv on PATH) and the
Dockerfile gets it through its BASE_IMAGE build argument; torch's CPU wheel comes through TORCH_INDEX
from a one-package index made from what the host's pip resolves for the pin. The steps after FROM are
the file's own. pip inside the build reaches the package index as the host's pip does: the host's pip
configuration (merged into one /etc/pip.conf), its CA certificates and the local folders it names are
mounted read-only into the build's RUN steps.

Cached between runs: the base image is made once (it stays in podman's storage), and podman's layer
cache keeps the dependency layer while pyproject.toml and the base are unchanged; only the project's
own layer is rebuilt. `containers/ci-setup.sh` (called by .ci/run) installs podman, runc and
debootstrap. podman runs with runc: crun fails on these machines (cgroups in hybrid mode).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.fixtures_ray import ROOT, free_ports, wait_for_dashboard
from tests.integration.test_job_submit import DEMO_SETS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PODMAN = ["podman", "--runtime", "runc"]
BASE_IMAGE = "localhost/domain-adapters-base:bookworm-py311"
IMAGE = "localhost/domain-adapters:test-cpu"
GPU_IMAGE = "localhost/domain-adapters:test-gpu"
DOMAINS = ("debate", "medicine", "education", "ecology")
TORCH_INDEX_IN_BUILD = "/torch-index"     # a fixed path: the build argument, and so the layer cache, stays the same
ARTIFACTS = ROOT / "test-artifacts"
IMAGE_UID_GID = "1000:100"                # the user of Ray's image, which the Dockerfiles run as
# the versions tested together (pyproject.toml holds ranges)
TORCH_PIN = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
RAY_PIN = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _check(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _pip_config() -> dict[str, str]:
    """The host pip's effective global options (files and PIP_* variables), as `pip config list` shows them."""
    r = _check(_run([sys.executable, "-m", "pip", "config", "list"], 60), "pip config list")
    conf: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(global|install|download|:env:)\.([\w-]+)='(.*)'$", line)
        if m:
            conf[m[2]] = m[3]
    return conf


def _pip_mounts(tmp: Path, leave_out: tuple[str, ...] = ()) -> list[str]:
    """-v options that give the build's pip what the host's has: one pip.conf with the host's options, and
    every local file or folder those options name (CA bundle, constraints, find-links, file:// indexes)."""
    conf = {k: v for k, v in _pip_config().items() if k not in leave_out}
    conf_file = tmp / "pip.conf"
    conf_file.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(conf.items())))
    mounts = {str(conf_file): "/etc/pip.conf"}
    for value in conf.values():
        for token in value.split():
            path = token
            if token.startswith("file://"):
                # a local index: its pages link to the wheels beside it (e.g. ../../files/x.whl), so the folder above
                path = os.path.dirname(token[len("file://"):].rstrip("/"))
            if path.startswith("/") and os.path.exists(path):
                mounts[path] = path
    cert = conf.get("cert")
    if cert and os.path.isdir(os.path.dirname(cert)):
        mounts[os.path.dirname(cert)] = os.path.dirname(cert)    # the bundle's folder (its links resolve there)
    return [f"-v={src}:{dst}:ro" for src, dst in mounts.items()]


def _torch_index(tmp: Path) -> Path:
    """A PEP 503 index holding the one torch wheel the host's pip picks for the pinned version (the CPU build
    on these machines; the image's own check fails the build if it is a CUDA build). The host's Python is
    Debian bookworm's minor version, as the base's is."""
    index = tmp / "torch-index"
    pkg = index / "torch"
    pkg.mkdir(parents=True)
    _check(_run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                 "-d", str(pkg), f"torch=={TORCH_PIN}"], 900), "pip download torch")
    wheels = sorted(p.name for p in pkg.glob("torch-*.whl"))
    assert len(wheels) == 1, wheels
    links = "".join(f'<a href="{w}">{w}</a>\n' for w in wheels)
    (pkg / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    (index / "index.html").write_text('<!DOCTYPE html><html><body><a href="torch/">torch</a></body></html>\n')
    return index


def _build(dockerfile: str, tag: str, build_args: dict[str, str], mounts: list[str]) -> str:
    """podman build on the local base (made once, then reused); size and times printed, the log kept."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run containers/ci-setup.sh (.ci/run does)")
    t0 = time.time()
    r = _check(_run(["bash", str(ROOT / "containers/local-base.sh"), BASE_IMAGE], 1800), "containers/local-base.sh")
    t_base = time.time() - t0
    t1 = time.time()
    build = _run([*PODMAN, "build", "--network=host", "-f", dockerfile, f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
                  *(f"--build-arg={k}={v}" for k, v in build_args.items()), *mounts, "-t", tag, "."], 2400, cwd=ROOT)
    t_build = time.time() - t1
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"container_build_{Path(dockerfile).name}.log").write_text(build.stdout + build.stderr)
    _check(build, f"podman build -f {dockerfile}")
    size = int(_check(_run(["podman", "image", "inspect", tag, "--format", "{{.Size}}"], 60), "inspect").stdout)
    cached = build.stdout.count("Using cache")
    print(f"\nimage {tag} ({dockerfile}): {size / 1e9:.2f} GB; base {t_base:.0f} s ({r.stdout.strip()}); "
          f"build {t_build:.0f} s ({cached} cached steps)")
    return tag


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory) -> str:
    """The CPU image from containers/Dockerfile.cpu, torch's CPU wheel through TORCH_INDEX."""
    tmp = tmp_path_factory.mktemp("image")
    mounts = _pip_mounts(tmp) + [f"-v={_torch_index(tmp)}:{TORCH_INDEX_IN_BUILD}:ro"]
    return _build("containers/Dockerfile.cpu", IMAGE, {"TORCH_INDEX": f"file://{TORCH_INDEX_IN_BUILD}"}, mounts)


def _podman_run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    # host network: Ray's ports and the dashboard on 127.0.0.1 (rootful podman's bridge needs a firewall
    # set-up these machines lack); /dev/shm big enough for Ray's object store
    return _run([*PODMAN, "run", "--rm", "--network=host", "--shm-size=2g", *args], timeout)


def _output_dir(tmp: Path, name: str) -> Path:
    out = tmp / name
    out.mkdir()
    os.chown(out, *(int(x) for x in IMAGE_UID_GID.split(":")))   # the image's user writes there, not root
    return out


def _assert_demo_output(out: Path) -> None:
    for d in DOMAINS:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / "adapters" / d / f).is_file(), f"adapters/{d}/{f}"
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["domains"]) == set(DOMAINS), summary.get("domains")
    assert (out / "report" / "summary.html").is_file() and (out / "report" / "summary.md").is_file()
    # written by the image's non-root user, not by root
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in out.rglob("*")}
    assert owners == {tuple(int(x) for x in IMAGE_UID_GID.split(":"))}, owners


def test_image_runs_as_non_root_and_has_the_project(cpu_image: str) -> None:
    user = _check(_run(["podman", "image", "inspect", cpu_image, "--format", "{{.Config.User}}"], 60), "inspect")
    assert user.stdout.strip() == IMAGE_UID_GID
    r = _check(_podman_run(cpu_image, "python", "-c",
                           "import os, ray, torch, pipeline; print(os.getuid(), ray.__version__, torch.__version__, "
                           "torch.version.cuda, os.getcwd(), sorted(os.listdir('.')))", timeout=300), "python in the image")
    uid, ray_v, torch_v, cuda, cwd, files = r.stdout.strip().split(" ", 5)
    assert uid == "1000" and ray_v == RAY_PIN and torch_v.split("+")[0] == TORCH_PIN and cuda == "None", r.stdout
    assert cwd == "/home/ray/domain-adapters"
    for must in ("configs", "fixtures", "pipeline", "jobs"):
        assert f"'{must}'" in files, files
    for never in (".git", ".venv", "output", "test-artifacts", "tests", "bench", "build"):
        assert f"'{never}'" not in files, files
    left = _check(_podman_run(cpu_image, "sh", "-c", "ls fixtures fixtures/custom; ls -d *.egg-info 2>/dev/null || true",
                              timeout=120), "ls in the image").stdout.split()
    assert "raw" in left and "law.jsonl" in left and "damaged" not in left and "formats" not in left, left
    assert not any(x.endswith(".egg-info") for x in left), left
    _check(_podman_run(cpu_image, timeout=300), "the image's default command (adapters --help)")


# the demo made small for 2 CPU cores as test_job_submit's, but with the evaluation stage on (small): every stage
# and every domain runs in the image (the full-size demo runs natively in the session's demo fixture)
IMAGE_DEMO_SETS = [s for s in DEMO_SETS if not s.startswith("train.eval_matrix")] + [
    "eval.generation_samples=2", "eval.side_by_side=2", "eval.max_new_tokens=16"]


def test_demo_runs_inside_the_image(cpu_image: str, tmp_path: Path) -> None:
    """`adapters run --config configs/demo.yaml` as the image's user, writing to a mounted folder: every stage,
    the evaluation included."""
    out = _output_dir(tmp_path, "demo-out")
    t0 = time.time()
    r = _podman_run(f"-v={out}:/home/ray/out", cpu_image,
                    "adapters", "run", "--config", "configs/demo.yaml", "--output", "/home/ray/out",
                    *(a for s in IMAGE_DEMO_SETS for a in ("--set", s)))
    (ARTIFACTS / "container_demo_run.log").write_text(r.stdout + r.stderr)
    _check(r, "adapters run inside the image")
    print(f"\ndemo inside the image: {time.time() - t0:.0f} s")
    _assert_demo_output(out)
    assert set(json.loads((out / "eval" / "matrix.json").read_text())["models"]) == {"base", *DOMAINS}


def test_ray_head_in_the_image_runs_the_demo_job_from_the_host(cpu_image: str, tmp_path: Path) -> None:
    """`ray start --head` with token auth inside the image; the host's `jobs/submit.py` sends the demo to it
    (its working_dir upload, metadata and auth), and the job succeeds. The demo with test_job_submit's small
    settings (every stage and domain still runs): the demo with its evaluation has just run in the image above."""
    out = _output_dir(tmp_path, "job-out")
    name = f"domain-adapters-test-{uuid.uuid4().hex[:8]}"
    gcs, dash, agent, metrics, client = free_ports(5)
    start = ("ray get-auth-token --generate > /dev/null && exec ray start --head --block "
             f"--node-ip-address=127.0.0.1 --port={gcs} --dashboard-host=127.0.0.1 --dashboard-port={dash} "
             f"--dashboard-agent-listen-port={agent} --metrics-export-port={metrics} "
             f"--ray-client-server-port={client} --num-cpus=2 --num-gpus=0 --disable-usage-stats")
    _check(_run([*PODMAN, "run", "-d", "--name", name, "--network=host", "--shm-size=2g",
                 "-e", "RAY_AUTH_MODE=token", "-e", f"RAY_ADDRESS=127.0.0.1:{gcs}", f"-v={out}:/home/ray/out",
                 cpu_image, "bash", "-c", start], 120), "podman run -d (ray start --head)")
    try:
        # the host side gets the token as a user would (from the head), into a HOME of its own
        home = tmp_path / "home"
        (home / ".ray").mkdir(parents=True)
        token, deadline = "", time.time() + 120
        while not token:    # `run -d` returns before the container's shell has generated it
            got = _run(["podman", "exec", name, "cat", "/home/ray/.ray/auth_token"], 60)
            token = got.stdout.strip() if got.returncode == 0 else ""
            if not token:
                state = _run(["podman", "inspect", name, "--format", "{{.State.Status}}"], 60).stdout.strip()
                assert state == "running" and time.time() < deadline, \
                    f"no token from the head ({state}): {_run(['podman', 'logs', name], 60).stderr[-3000:]}"
                time.sleep(1)
        assert len(token) >= 16
        (home / ".ray" / "auth_token").write_text(token)
        (home / ".ray" / "auth_token").chmod(0o600)
        url = f"http://127.0.0.1:{dash}"
        wait_for_dashboard(url, {"Authorization": f"Bearer {token}"}, timeout_s=180)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HOME=str(home), RAY_AUTH_MODE="token")
        t0 = time.time()
        r = _run([sys.executable, "-m", "jobs.submit", "--config", "configs/demo.yaml", "--address", url,
                  "--output", "/home/ray/out", "--job-name", "container-demo",
                  *(a for s in DEMO_SETS for a in ("--set", s))], 1500, cwd=ROOT, env=env)
        (ARTIFACTS / "container_job.log").write_text(r.stdout + r.stderr)
        assert r.returncode == 0, f"jobs.submit: {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
        print(f"\ndemo as a Ray job on the image's head: {time.time() - t0:.0f} s")
        # the head's own record of the job: succeeded, with the submitter's metadata; no token in the logs
        req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            jobs = [j for j in json.loads(resp.read()) if (j.get("metadata") or {}).get("job_name") == "container-demo"]
        assert len(jobs) == 1 and jobs[0]["status"] == "SUCCEEDED", jobs
        assert token not in r.stdout + r.stderr
        _assert_demo_output(out)
    finally:
        logs = _run(["podman", "logs", name], 60)
        (ARTIFACTS / "container_ray_head.log").write_text(logs.stdout + logs.stderr)
        _run([*PODMAN, "rm", "-f", "-t", "5", name], 120)


@pytest.mark.gpu_image
def test_gpu_image_builds_up_to_cuda(tmp_path: Path) -> None:
    """containers/Dockerfile with its defaults (TORCH_INDEX empty: PyPI's CUDA 13.0 torch), on the same base:
    its own checks pass (Ray's version, torch a CUDA build) and everything short of a GPU works: the
    imports, the [gpu] extra, `adapters --help`. The host's find-links are left out of this build's pip
    configuration: they hold torch's CPU wheel, which pip would rank above PyPI's (its local version label)."""
    mounts = _pip_mounts(tmp_path, leave_out=("find-links",))
    tag = _build("containers/Dockerfile", GPU_IMAGE, {}, mounts)
    r = _check(_podman_run(tag, "python", "-c",
                           "import os, ray, torch, liger_kernel, bitsandbytes, peft, transformers, pipeline.cli; "
                           "print(os.getuid(), ray.__version__, torch.__version__, torch.version.cuda, "
                           "torch.cuda.is_available())", timeout=600), "python in the GPU image")
    uid, ray_v, torch_v, cuda, available = r.stdout.split()[-5:]
    assert uid == "1000" and ray_v == RAY_PIN and torch_v.split("+")[0] == TORCH_PIN, r.stdout   # e.g. 2.13.0+cu130
    assert cuda.startswith("13.") and available == "False", r.stdout     # a CUDA build, and no GPU here
    helped = _check(_podman_run(tag, timeout=300), "the GPU image's default command (adapters --help)")
    assert "usage: adapters" in helped.stdout
