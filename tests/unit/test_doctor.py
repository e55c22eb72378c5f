"""adapters doctor / preflight on this CPU-only machine."""
from __future__ import annotations

import time

import pytest

from pipeline import doctor
from pipeline.config import Config
from pipeline.errors import UserFacingError
from pipeline.lm.device import CudaUnavailableError, parse_nvidia_smi, probe_cuda, worker_device

pytestmark = pytest.mark.timeout(120)

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "vocab_size": 32768, "tie_word_embeddings": False}


def make_cfg(tmp_path, device="cpu", **kw) -> Config:
    d = {"output": str(tmp_path / "out"), "model": {"base": "tiny"}, "resources": {"device": device},
         "data": {"raw_dir": str(tmp_path / "raw"), "download": {"offline": True}}}
    for k, v in kw.items():
        d[k] = v
    return Config.model_validate(d)


@pytest.fixture(autouse=True)
def _no_ray_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def rows(rep):
    return {r.name: r for r in rep.rows}


def test_cpu_config_passes_with_no_cuda_as_expected(tmp_path, capsys):
    code = doctor.run_doctor(make_cfg(tmp_path))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "check" in out and "status" in out and "fix" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("cuda"))
    assert "PASS" in line and "no CUDA, as expected" in line
    for name in ("python", "packages", "bitsandbytes", "ray", "output", "base model", "memory"):
        assert any(ln.startswith(name) for ln in out.splitlines()), name


def test_gpu_config_without_cuda_fails_with_the_cause(tmp_path, capsys):
    cfg = make_cfg(tmp_path, device="cuda")
    assert doctor.run_doctor(cfg) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("cuda"))
    assert "FAIL" in line and "CUDA cannot be used" in line
    with pytest.raises(UserFacingError) as e:   # no silent CPU fallback: train's pre-flight stops here
        doctor.preflight(cfg)
    assert "cuda" in str(e.value) and "fix:" in str(e.value)


def test_cuda_init_error_text_is_reported(tmp_path, monkeypatch):
    """The seed's error 304: torch's own exception text reaches the table."""
    monkeypatch.setattr(doctor, "probe_cuda", lambda: {
        "available": False, "gpus": [], "torch": "2.13.0", "runtime": "12.8",
        "cause": "RuntimeError: CUDA driver initialization failed: Error 304: OS call failed or operation not supported on this OS"})
    rep = doctor.Report()
    doctor.check_cuda(make_cfg(tmp_path, device="cuda"), rep)
    r = rows(rep)["cuda"]
    assert r.status == "FAIL" and "Error 304" in r.detail and "nvidia-smi" in r.fix


def test_preflight_passes_on_cpu_config(tmp_path):
    doctor.preflight(make_cfg(tmp_path))


@pytest.mark.parametrize("how", ["file_as_dir", "under_a_file"])
def test_broken_output_location_fails_with_fix(tmp_path, how):
    f = tmp_path / "afile"
    f.write_text("x")
    out = str(f) if how == "file_as_dir" else str(f / "sub")
    rep = doctor.Report()
    doctor.check_output(make_cfg(tmp_path, output=out), rep)
    r = rows(rep)["output"]
    assert r.status == "FAIL" and "afile" in r.detail and "--output" in r.fix


def test_unreachable_ray_address_fails_fast(tmp_path):
    cfg = make_cfg(tmp_path, resources={"device": "cpu", "ray_address": "127.0.0.1:1"})
    t0 = time.time()
    rep = doctor.Report()
    doctor.check_ray(cfg, rep)
    assert time.time() - t0 < 10
    r = rows(rep)["ray"]
    assert r.status == "FAIL" and "127.0.0.1:1" in r.detail and "ray_address" in r.fix
    with pytest.raises(UserFacingError, match="ray"):
        doctor.preflight(cfg)


def test_ray_address_from_env_and_auto_without_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    rep = doctor.Report()
    doctor.check_ray(make_cfg(tmp_path), rep)
    assert rows(rep)["ray"].status == "FAIL"
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    rep = doctor.Report()
    doctor.check_ray(make_cfg(tmp_path, resources={"device": "cpu", "ray_address": "auto"}), rep)
    assert rows(rep)["ray"].status == "FAIL" and "ray start --head" in rows(rep)["ray"].fix


def test_memory_estimate_7b_mistral_is_sane():
    e = doctor.estimate_memory(MISTRAL_7B, 2048, 16, "all-linear", True)
    assert 6.5 < e["params_b"] < 7.8
    assert 3 < e["weights_gb"] < 5
    assert 4 < e["total_gb"] < 20, e
    no_ckpt = doctor.estimate_memory(MISTRAL_7B, 2048, 16, "all-linear", False)
    assert no_ckpt["total_gb"] > e["total_gb"] + 5
    # the seed's measured baseline: 2 x 512 tokens, q_proj/v_proj, checkpointing: 5.6 GB peak on an H100
    seed = doctor.estimate_memory(MISTRAL_7B, 1024, 16, ["q_proj", "v_proj"], True)
    assert 4.5 < seed["total_gb"] < 7.5, seed


def test_memory_check_too_big_says_what_to_lower(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, device="cuda", train={"tokens_per_micro_batch": 32768, "gradient_checkpointing": False})
    rep = doctor.Report()
    doctor.check_memory(cfg, rep, MISTRAL_7B, {"available": True, "gpus": [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "memory_gb": 24.0, "cc": "8.6", "bf16": True}]})
    r = rows(rep)["memory"]
    assert r.status == "FAIL" and "RTX 3090" in r.detail
    assert "tokens_per_micro_batch" in r.fix and "gradient_checkpointing" in r.fix
    rep = doctor.Report()
    cfg = make_cfg(tmp_path, device="cuda", train={"tokens_per_micro_batch": 2048})
    doctor.check_memory(cfg, rep, MISTRAL_7B, {"available": True, "gpus": [
        {"index": 0, "name": "NVIDIA GeForce RTX 3090", "memory_gb": 24.0, "cc": "8.6", "bf16": True}]})
    assert rows(rep)["memory"].status == "PASS"
    assert "keeps layers' activations up to 20.0 GB" in rows(rep)["memory"].detail   # checkpoint_keep_last auto
    rep = doctor.Report()
    doctor.check_memory(cfg, rep, MISTRAL_7B, {"available": True, "gpus": [
        {"index": 0, "name": "NVIDIA T4", "memory_gb": 15.0, "cc": "7.5", "bf16": False}]})
    assert "up to 12.8 GB" in rows(rep)["memory"].detail                              # 85% of a 15 GB card


def test_base_model_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    rep = doctor.Report()
    doctor.check_model(make_cfg(tmp_path, model={"base": str(tmp_path / "nope")}), rep, network=False)
    assert rep.rows[-1].status == "FAIL" and "not found" in rep.rows[-1].detail and "model.base" in rep.rows[-1].fix
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 64}')
    doctor.check_model(make_cfg(tmp_path, model={"base": str(d)}), rep, network=False)
    assert rep.rows[-1].status == "FAIL" and "weights" in rep.rows[-1].detail
    (d / "model.safetensors").write_bytes(b"x")
    doctor.check_model(make_cfg(tmp_path, model={"base": str(d)}), rep, network=False)
    assert rep.rows[-1].status == "PASS"
    # offline and not cached: a clear failure, no network call
    doctor.check_model(make_cfg(tmp_path, model={"base": "someone/not-cached-model"}), rep, network=True)
    assert rep.rows[-1].status == "FAIL" and "offline" in rep.rows[-1].detail
    arch, _ = doctor.check_model(make_cfg(tmp_path), rep, network=False)
    assert rep.rows[-1].status == "INFO" and arch["hidden_size"] == 128


def _listening_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_ray_auth_error_is_explained_and_gpu_resources_checked(tmp_path, monkeypatch):
    """ray.init runs in a subprocess (bounded); its outcome is faked here: an auth failure, then a
    cluster without GPUs (and no autoscaler) for a cuda config, then one with GPUs."""
    import subprocess as sp
    from pipeline.capacity import Capacity
    srv = _listening_port()
    addr = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        results = iter([
            sp.CompletedProcess([], 1, "", "ConnectionError: Failed to connect to GCS: UNAUTHENTICATED: invalid auth token"),
            sp.CompletedProcess([], 0, "@@" + Capacity(nodes=[{"CPU": 8}]).model_dump_json() + "\n", ""),
            sp.CompletedProcess([], 0, "@@" + Capacity(nodes=[{"CPU": 8, "GPU": 2, "accelerator_type:RTX": 1}])
                                .model_dump_json() + "\n", ""),
        ])
        monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: next(results))
        rep = doctor.Report()
        doctor.check_ray(make_cfg(tmp_path, resources={"device": "cpu", "ray_address": addr}), rep)
        assert rep.rows[-1].status == "FAIL" and "RAY_AUTH_MODE=token" in rep.rows[-1].fix
        gpu_cfg = make_cfg(tmp_path, resources={"device": "cuda", "ray_address": addr})
        doctor.check_ray(gpu_cfg, rep)
        assert rep.rows[-1].status == "FAIL" and "0 GPU" in rep.rows[-1].detail and "--num-gpus" in rep.rows[-1].fix
        doctor.check_ray(gpu_cfg, rep)
        assert rep.rows[-1].status == "PASS" and "2 GPU: 2 trial(s) fit now (RTX)" in rep.rows[-1].detail
    finally:
        srv.close()


def test_cpu_only_driver_of_a_gpu_cluster_is_not_a_failure(tmp_path, monkeypatch):
    """A CPU head node driving GPU workers: no local CUDA is a WARN; the cluster's GPUs decide."""
    import subprocess as sp
    from pipeline.capacity import Capacity
    srv = _listening_port()
    addr = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        out = "@@" + Capacity(nodes=[{"CPU": 8}, {"CPU": 4, "GPU": 1}]).model_dump_json() + "\n"
        monkeypatch.setattr(doctor.subprocess, "run", lambda *a, **k: sp.CompletedProcess([], 0, out, ""))
        cfg = make_cfg(tmp_path, resources={"device": "cuda", "ray_address": addr})
        rep = doctor.collect(cfg, full=False)
        r = rows(rep)
        assert r["cuda"].status == "WARN" and r["ray"].status == "PASS" and "1 GPU" in r["ray"].detail
        doctor.preflight(cfg)
        out = "@@" + Capacity(nodes=[{"CPU": 8}]).model_dump_json() + "\n"
        with pytest.raises(UserFacingError, match="0 GPU"):
            doctor.preflight(cfg)
        # no GPU yet, but an autoscaler that adds GPU workers: INFO, and the run goes ahead
        from pipeline.capacity import NodeType
        out = "@@" + Capacity(nodes=[{"CPU": 8}], autoscaler="v1", node_types=[
            NodeType(name="gpu", resources={"CPU": 4, "GPU": 1}, max_workers=4)]).model_dump_json() + "\n"
        rep = doctor.collect(cfg, full=False)
        assert rows(rep)["ray"].status == "INFO" and "autoscaler can add nodes" in rows(rep)["ray"].detail
        doctor.preflight(cfg)
    finally:
        srv.close()


def test_worker_device_refuses_cuda_it_cannot_use(tmp_path):
    """A worker's own CUDA check (pipeline.lm.device; doctor's dead require_cuda is gone): a cpu config computes
    on the CPU, a cuda one on a machine where torch sees no CUDA stops with the cause, never falls back."""
    assert worker_device(make_cfg(tmp_path)) == "cpu"
    if probe_cuda()["available"]:
        pytest.skip("this machine has a working CUDA: the refusal needs one without")
    with pytest.raises(CudaUnavailableError, match="CUDA cannot be used on node"):
        worker_device(make_cfg(tmp_path, device="cuda"), allow_fake_gpu=False)


SMI_3090 = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.120                Driver Version: 550.120        CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
|   0  NVIDIA GeForce RTX 3090        Off |   00000000:01:00.0 Off |                  N/A |
"""


def _torch_build(tmp_path, device, torch_cuda, driver, driver_cuda):
    rep = doctor.Report()
    doctor.check_torch_build(make_cfg(tmp_path, device=device), rep, {
        "torch": "2.13.0" + ("" if torch_cuda else "+cpu"), "runtime": torch_cuda, "driver": driver,
        "driver_cuda": driver_cuda})
    return rows(rep).get("torch build")


def test_doctor_names_the_install_route_the_driver_needs(tmp_path):
    """PyPI's torch is the CUDA 13.0 build (driver >= 580); a 3090 workstation on driver 550 needs torch's
    CUDA 12 build; a driver older than 525 runs neither."""
    assert parse_nvidia_smi(SMI_3090) == {"driver": "550.120", "driver_cuda": "12.4"}
    r = _torch_build(tmp_path, "cuda", "13.0", **parse_nvidia_smi(SMI_3090))
    assert r.status == "FAIL" and "built for CUDA 13.0, newer than the driver 550.120 runs CUDA <= 12.4" in r.detail
    assert "CUDA 12 route" in r.fix and doctor.TORCH_CUDA12_INDEX in r.fix and ">= 580" in r.fix
    r = _torch_build(tmp_path, "cuda", "12.8", "550.120", "12.4")
    assert r.status == "PASS" and "built for CUDA 12.8" in r.detail
    r = _torch_build(tmp_path, "cuda", "13.0", "580.95.05", None)       # no header: from the driver version
    assert r.status == "PASS"
    r = _torch_build(tmp_path, "cuda", None, "595.58.03", "13.2")       # the CPU wheel on a GPU machine
    assert r.status == "FAIL" and "CPU build" in r.detail and "CUDA 13.0 route: pip install -e '.[gpu]'" in r.fix
    assert _torch_build(tmp_path, "cpu", None, "595.58.03", "13.2").status == "INFO"
    r = _torch_build(tmp_path, "cuda", "13.0", "470.82.01", None)
    assert r.status == "FAIL" and r.fix.startswith("upgrade the NVIDIA driver")
    assert _torch_build(tmp_path, "cuda", None, None, None) is None      # no driver: the cuda row speaks
