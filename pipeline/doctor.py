"""`adapters doctor`: pre-flight checks, printed as a table (check, status, detail, fix).

    run_doctor(cfg, load=False) -> int   every check (connects to Ray, may ask the Hub about the model),
                                         exit status 1 when anything FAILs
    preflight(cfg) -> None               the checks that cost nothing (no model load, no Ray connect, no
                                         network); raises UserFacingError listing the failures. The train
                                         stage calls it first, so a GPU run on a machine without CUDA
                                         stops at once with the cause instead of falling back to the CPU.
                                         With a Ray address and no local CUDA (a CPU-only head node) it
                                         connects to Ray (bounded) and fails when the cluster has no GPUs.

Statuses: PASS (fine), INFO (nothing to fix), WARN (works, but look), FAIL (the run would fail).
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import Any, Optional

from pipeline import layout
from pipeline.capacity import assess, Capacity
from pipeline.errors import UserFacingError
from pipeline.lm.device import GB, probe_cuda
from pipeline.lm.kernels import effective_budget_gb
from pipeline.lm.model import load_model, load_tokenizer
from pipeline.lm.serving import config_serving_warnings
from pipeline.storage import open_store, StorageError, Store

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"
REFERENCE_GPU_GB = 24.0   # the design's target: one RTX 3090
_TRUTHY = ("1", "true", "yes", "on")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Report:
    rows: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        c = Check(name, status, detail, fix)
        self.rows.append(c)
        return c

    @property
    def failures(self) -> list[Check]:
        return [r for r in self.rows if r.status == FAIL]

    def table(self) -> str:
        head = ("check", "status", "detail", "fix")
        rows = [(r.name, r.status, r.detail, r.fix) for r in self.rows]
        w = [min(60, max(len(str(x[i])) for x in rows + [head])) for i in range(3)]
        out = []
        for row in [head] + rows:
            line = "  ".join(str(row[i]).ljust(w[i]) for i in range(3))
            out.append((line + "  " + row[3]).rstrip())
            if row is head:
                out.append("  ".join("-" * w[i] for i in range(3)) + "  ---")
        return "\n".join(out)


# ---- packages ------------------------------------------------------------------------------------

def _pins() -> dict[str, str]:
    """{package: tested version} for the project's own dependencies: their versions in constraints.txt (the set
    tested together) in a checkout, else the exact pins (==) among the installed project's requirements."""
    reqs: list[str] = []
    root = Path(__file__).resolve().parents[1]
    try:
        reqs = [r for r in (md.requires("domain-adapters") or []) if "extra ==" not in r]
    except md.PackageNotFoundError:
        py = root / "pyproject.toml"
        if py.is_file():
            import tomllib
            reqs = tomllib.loads(py.read_text())["project"]["dependencies"]
    names = {}
    for r in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(?:==\s*([^;,\s]+))?", r)
        if m:
            names[m.group(1).lower().replace("_", "-")] = (m.group(1), m.group(2))
    tested = {}
    cons = root / "constraints.txt"
    if cons.is_file():
        for line in cons.read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)", line.strip())
            if m:
                tested[m.group(1).lower().replace("_", "-")] = m.group(2)
    pins = {}
    for key, (name, exact) in names.items():
        if tested.get(key) or exact:
            pins[name] = tested.get(key) or exact
    return pins


def _base_version(v: str) -> str:
    return v.split("+", 1)[0]


# needed only by some configs or stages: missing ones are a WARN unless the config uses them
_OPTIONAL = {"boto3": "s3:// outputs or models", "matplotlib": "the report's plots"}


def check_packages(rep: Report, cfg=None) -> None:
    rep.add("python", PASS if sys.version_info >= (3, 10) else FAIL,
            f"{platform.python_version()} ({sys.executable})", "" if sys.version_info >= (3, 10) else "use Python >= 3.10")
    missing, off = [], []
    pins = _pins()
    for name, want in pins.items():
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            missing.append(f"{name}=={want}")
            continue
        if _base_version(have) != want:
            off.append(f"{name} {have} (pin {want})")
    uses_s3 = cfg is not None and (str(cfg.output).startswith("s3://") or str(cfg.model.base).startswith("s3://"))
    needed = [m for m in missing if m.split("==")[0] not in _OPTIONAL or (m.startswith("boto3") and uses_s3)]
    optional = [m for m in missing if m not in needed]
    if needed:
        rep.add("packages", FAIL, "missing: " + ", ".join(needed), "pip install -c constraints.txt -e . (installs the tested versions)")
    if optional:
        rep.add("packages", WARN, "missing: " + ", ".join(f"{m} (for {_OPTIONAL[m.split('==')[0]]})" for m in optional),
                "pip install -c constraints.txt -e . (installs the tested versions)")
    if off:
        rep.add("packages", WARN, "differ from the tested versions (constraints.txt): " + ", ".join(off),
                "pip install -c constraints.txt -e . to get the tested versions (others in pyproject.toml's ranges may work)")
    if not missing and not off:
        rep.add("packages", PASS, f"{len(pins)} packages at their tested versions" if pins else "no pins found (project not installed?)")


# ---- CUDA, GPUs, bitsandbytes --------------------------------------------------------------------

# Two ways to install the pinned torch on Linux x86-64 (docs/CLUSTER.md, "GPU installs"). PyPI's wheel is built
# for PYPI_TORCH_CUDA (tests/unit/test_gpu_install.py checks this against the wheel's own metadata); an older
# driver needs torch's CUDA 12 build from PyTorch's index. NVIDIA's minimum driver per CUDA major version
# (minor version compatibility): CUDA 13.x >= 580, 12.x >= 525.
PYPI_TORCH_CUDA = "13.0"
MIN_DRIVER = {13: 580, 12: 525}
TORCH_CUDA12_INDEX = "https://download.pytorch.org/whl/cu128"


def driver_max_cuda(driver: Optional[str], driver_cuda: Optional[str]) -> Optional[int]:
    """The newest CUDA major version a driver runs: nvidia-smi's own 'CUDA Version', else from its version."""
    if driver_cuda:
        return int(driver_cuda.split(".")[0])
    if not driver:
        return None
    major = int(driver.split(".")[0])
    return max((cu for cu, need in MIN_DRIVER.items() if major >= need), default=0)


def install_route(max_cuda: int) -> str:
    """The commands that give this machine a torch its driver runs."""
    torch_pin = _pins().get("torch", "<pin>")
    if max_cuda >= int(PYPI_TORCH_CUDA.split(".")[0]):
        return f"the CUDA {PYPI_TORCH_CUDA} route: pip install -e '.[gpu]' (PyPI's torch=={torch_pin} is that build)"
    if max_cuda >= 12:
        return (f"the CUDA 12 route: make venv EXTRAS=dev,gpu TORCH_INDEX={TORCH_CUDA12_INDEX} (or pip install "
                f"torch=={torch_pin} --index-url {TORCH_CUDA12_INDEX}, then pip install -e '.[gpu]'); or upgrade the "
                f"driver to >= {MIN_DRIVER[13]} for the CUDA {PYPI_TORCH_CUDA} route")
    return f"upgrade the NVIDIA driver: >= {MIN_DRIVER[13]} for PyPI's torch (CUDA {PYPI_TORCH_CUDA}), >= {MIN_DRIVER[12]} for its CUDA 12 build"


def check_torch_build(cfg, rep: Report, info: dict[str, Any]) -> None:
    """Which torch build this machine's driver needs, and whether the installed one is it."""
    max_cuda = driver_max_cuda(info.get("driver"), info.get("driver_cuda"))
    if max_cuda is None:
        return   # no NVIDIA driver here (a CPU machine or a CPU-only head node): the cuda row says what that means
    want = cfg.resources.device == "cuda"
    torch_cuda = info.get("runtime")
    drv = f"driver {info.get('driver') or '?'} runs CUDA <= {info.get('driver_cuda') or f'{max_cuda}.x'}"
    if torch_cuda and int(torch_cuda.split(".")[0]) <= max_cuda:
        rep.add("torch build", PASS, f"torch {info.get('torch')} is built for CUDA {torch_cuda}; {drv}")
        return
    what = (f"torch {info.get('torch')} is built for CUDA {torch_cuda}, newer than the {drv}" if torch_cuda else
            f"torch {info.get('torch')} is a CPU build; {drv}")
    rep.add("torch build", FAIL if want else INFO, what, install_route(max_cuda))


def check_cuda(cfg, rep: Report) -> dict[str, Any]:
    try:
        info = probe_cuda()
    except Exception as e:
        rep.add("cuda", FAIL, f"cannot import torch: {e}", "pip install -e .")
        return {"available": False, "gpus": []}
    want_cuda = cfg.resources.device == "cuda"
    if not info["available"]:
        addr = _ray_address(cfg)
        if want_cuda and addr:
            rep.add("cuda", WARN, f"no CUDA on this machine ({info['cause']}); training runs on the GPU workers of "
                    f"the Ray cluster at {addr}, and each worker checks CUDA itself before it starts",
                    "nothing, if this is a CPU-only head node; `adapters doctor` checks the cluster's GPU resources")
        elif want_cuda:
            max_cuda = driver_max_cuda(info.get("driver"), info.get("driver_cuda"))
            fix = ("install a CUDA build of torch that this driver runs: " + install_route(max_cuda)
                   if max_cuda is not None and ("CPU-only build" in info["cause"] or "too old" in info["cause"]) else
                   "install the CUDA build of torch (PyPI's torch==<pin> on Linux x86-64, not the +cpu wheel)"
                   if "CPU-only build" in info["cause"] else
                   "check the driver with nvidia-smi; error 304 / NVML errors usually mean the driver and the "
                   "container's CUDA do not match, or the GPU is not passed into the container (--gpus all); "
                   "or set resources.device: cpu to train on the CPU on purpose")
            rep.add("cuda", FAIL, f"resources.device is cuda but CUDA cannot be used: {info['cause']}", fix)
        else:
            rep.add("cuda", PASS, f"no CUDA, as expected for resources.device=cpu ({info['cause']})")
        return info
    rep.add("cuda", PASS if want_cuda else INFO,
            f"torch {info['torch']}, CUDA runtime {info['runtime']}, driver {info.get('driver') or 'unknown'}, "
            f"{len(info['gpus'])} GPU(s)" + ("" if want_cuda else "; resources.device=cpu, so they go unused"))
    for g in info["gpus"]:
        rep.add(f"gpu {g['index']}", PASS, f"{g['name']}, {g['memory_gb']:.1f} GB, compute {g['cc']}"
                + (", bf16" if g["bf16"] else ", no bf16 (fp16 with loss scaling)"))
    return info


def check_bitsandbytes(cfg, rep: Report, cuda: dict[str, Any]) -> None:
    if cfg.model.quantization != "nf4":
        rep.add("bitsandbytes", INFO, "model.quantization=none: not used")
        return
    try:
        import io, contextlib
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import bitsandbytes
            from bitsandbytes import cextension
    except Exception as e:
        rep.add("bitsandbytes", FAIL, f"import failed: {type(e).__name__}: {e}", "pip install bitsandbytes==<pin>")
        return
    lib = getattr(cextension, "lib", None)
    path = getattr(getattr(lib, "_lib", None), "_name", "") or ""
    compiled_cuda = bool(getattr(lib, "compiled_with_cuda", False))
    backend = getattr(cextension, "BNB_BACKEND", "?")
    libname = os.path.basename(path) or "no native library"
    if cfg.resources.device == "cpu":
        rep.add("bitsandbytes", PASS, f"{bitsandbytes.__version__}, {backend} backend ({libname}): 4-bit runs on the CPU")
        return
    if not cuda.get("available"):
        rep.add("bitsandbytes", WARN, f"{bitsandbytes.__version__}, {backend} backend ({libname}); no CUDA to match",
                "fix CUDA first")
        return
    runtime = (cuda.get("runtime") or "").replace(".", "")[:3]
    m = re.search(r"cuda(\d+)", libname)
    if not compiled_cuda or not m:
        rep.add("bitsandbytes", FAIL, f"{bitsandbytes.__version__} loaded {libname} ({backend}), not a CUDA library",
                "reinstall bitsandbytes for your CUDA (pip install --force-reinstall bitsandbytes==<pin>); "
                "unset BNB_CUDA_VERSION if set")
    elif runtime and not runtime.startswith(m.group(1)[:len(runtime)]) and m.group(1) != runtime:
        rep.add("bitsandbytes", WARN, f"{libname} vs torch CUDA runtime {cuda.get('runtime')}",
                "unset BNB_CUDA_VERSION, or install a bitsandbytes built for this CUDA")
    else:
        rep.add("bitsandbytes", PASS, f"{bitsandbytes.__version__}, {libname} matches CUDA runtime {cuda.get('runtime')}")


# ---- Ray -----------------------------------------------------------------------------------------

def _ray_address(cfg) -> Optional[str]:
    return cfg.resources.ray_address or os.environ.get("RAY_ADDRESS") or None


def _host_port(addr: str) -> Optional[tuple[str, int]]:
    a = re.sub(r"^[a-z]+://", "", addr).split("/")[0]
    if ":" not in a:
        return None
    host, _, port = a.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


_RAY_FIX = ("check the address (host:port of the head's GCS, default port 6379; ray://host:10001 for Ray Client), "
            "that the head is running (`ray status` on it) and that no firewall blocks the port; "
            "or leave resources.ray_address unset (and RAY_ADDRESS) to start a local Ray")
_AUTH_FIX = ("the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the head's token> "
             "(or RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")


def check_ray(cfg, rep: Report, connect: bool = True, timeout_s: float = 3.0) -> dict[str, Any]:
    addr = _ray_address(cfg)
    if not addr:
        n = cfg.resources.num_cpus or os.cpu_count()
        rep.add("ray", INFO, f"no ray_address / RAY_ADDRESS: the pipeline starts a local Ray ({n} CPUs)")
        return {}
    if addr.startswith(("http://", "https://")):
        rep.add("ray", WARN, f"{addr} is a dashboard / job-submission address",
                "use it with `ray job submit --address`; for resources.ray_address give the GCS address "
                "(host:6379), 'auto' or ray://host:10001")
    if addr == "auto":
        if not (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster").exists():
            rep.add("ray", FAIL, "address 'auto' but no Ray cluster runs on this machine",
                    "start one (`ray start --head`), give its address, or unset the address to start a local Ray")
            return {}
    else:
        hp = _host_port(addr)
        if hp is None:
            rep.add("ray", FAIL, f"cannot parse Ray address {addr!r}", "use host:port, ray://host:port or 'auto'")
            return {}
        try:
            with socket.create_connection(hp, timeout=timeout_s):
                pass
        except OSError as e:
            rep.add("ray", FAIL, f"cannot reach Ray at {addr}: {e.strerror or e}", _RAY_FIX)
            return {}
    if not connect:
        rep.add("ray", PASS, f"{addr} reachable (not connected: pre-flight)")
        return {}
    code = ("import ray; from pipeline.capacity import read_capacity; "
            "ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print('@@' + read_capacity().model_dump_json())" % addr)
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        rep.add("ray", FAIL, f"{addr} is reachable but ray.init did not finish in 90 s", _RAY_FIX)
        return {}
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@")), None)
    if p.returncode != 0 or line is None:
        err = (p.stderr or p.stdout).strip().splitlines()
        last = next((ln for ln in reversed(err) if ln.strip()), "no output")[:300]
        auth = re.search(r"auth|token|UNAUTHENTICATED|Unauthenticated", p.stderr or "")
        rep.add("ray", FAIL, f"ray.init({addr!r}) failed: {last}", _AUTH_FIX if auth else _RAY_FIX)
        return {}
    cap = Capacity.model_validate_json(line[2:])
    ray_row(cfg, rep, addr, cap)
    return cap.model_dump()


def ray_row(cfg, rep: Report, addr: str, cap) -> None:
    """The cluster's capacity against a trial's needs (pipeline.capacity.assess, as the train stage
    decides): fits now PASS; none now but an autoscaler can add nodes INFO; nothing can FAIL."""
    types = sorted({k.split(":", 1)[1] for node in cap.nodes for k in node if k.startswith("accelerator_type:")})
    verdict = assess(cap, cfg.resources, len(cfg.domains))
    detail = f"{addr}: {verdict.detail}" + (f" ({', '.join(types)})" if types else "")
    status = {"ready": PASS, "scale_up": INFO, "may_scale_up": INFO, "impossible": FAIL}[verdict.state]
    rep.add("ray", status, detail, verdict.fix)


# ---- output --------------------------------------------------------------------------------------

def check_output(cfg, rep: Report) -> None:
    try:
        store = open_store(cfg)
        store.check_writable()
        rep.add("output", PASS, f"{store.uri} writable")
    except StorageError as e:
        rep.add("output", FAIL, str(e).split(";")[0],
                (str(e).split(";", 1)[1].strip() if ";" in str(e) else "")
                or "choose another --output (a writable local directory or s3://bucket/prefix)")
    except Exception as e:
        rep.add("output", FAIL, f"cannot use output {cfg.output}: {type(e).__name__}: {e}",
                "choose another --output (a writable local directory or s3://bucket/prefix)")


# ---- base model ----------------------------------------------------------------------------------

def _offline(cfg) -> bool:
    return bool(cfg.data.download.offline) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def tiny_arch(cfg) -> dict[str, Any]:
    t = cfg.model.tiny
    return {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "tie_word_embeddings": False}


def check_model(cfg, rep: Report, network: bool) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(architecture config dict or None, local path of the model or None)."""
    base = cfg.model.base
    if base == "tiny":
        try:
            store = open_store(cfg)
            built = (not store.is_s3) and store.local_path(f"{layout.TINY_BASE}/config.json").is_file()
        except Exception:
            store, built = None, False
        if built:
            rep.add("base model", PASS, f"tiny model already built at {store.local_path(layout.TINY_BASE)}")
            return tiny_arch(cfg), str(store.local_path(layout.TINY_BASE))
        rep.add("base model", INFO, "tiny: built from model.tiny at the start of train (nothing to fetch)")
        return tiny_arch(cfg), None
    if base.startswith("s3://"):
        if not network:
            rep.add("base model", INFO, f"{base}: copied to the local cache at train time (not checked in pre-flight)")
            return None, None
        try:
            st = Store(base, cfg.storage)
            if not st.is_file("config.json"):
                rep.add("base model", FAIL, f"no config.json under {base}",
                        "point model.base at the directory holding config.json and the weights")
                return None, None
            rep.add("base model", PASS, f"{base}: config.json found")
            return st.read_json("config.json"), None
        except Exception as e:
            rep.add("base model", FAIL, f"cannot read {base}: {e}", "check storage.endpoint_url and the AWS credentials")
            return None, None
    p = Path(base).expanduser()
    if p.is_dir():
        weights = [f for pat in ("*.safetensors", "*.bin", "*.safetensors.index.json") for f in glob.glob(str(p / pat))]
        if not (p / "config.json").is_file() or not weights:
            has_cfg = (p / "config.json").is_file()
            rep.add("base model", FAIL, f"{p} has no " + ("weights" if has_cfg else "config.json"),
                    "point model.base at a saved model directory (config.json + *.safetensors) or a Hugging Face id")
            return (json.loads((p / "config.json").read_text()) if has_cfg else None), None
        rep.add("base model", PASS, f"local directory {p} ({len(weights)} weight file(s))")
        return json.loads((p / "config.json").read_text()), str(p)
    if base.startswith(("/", ".", "~")) or base.count("/") > 1:
        rep.add("base model", FAIL, f"base model not found at {base}",
                "set model.base to a Hugging Face id (owner/name), a local directory or an s3:// URI")
        return None, None
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(base, "config.json", revision=cfg.model.revision)
    if isinstance(cached, str):
        snap = str(Path(cached).parent)
        has_weights = any(glob.glob(os.path.join(snap, pat)) for pat in ("*.safetensors", "*.bin"))
        rep.add("base model", PASS if has_weights else INFO,
                f"{base}: in the Hugging Face cache ({snap})" + ("" if has_weights else "; weights not cached yet"))
        return json.loads(Path(cached).read_text()), snap if has_weights else None
    if _offline(cfg):
        rep.add("base model", FAIL, f"{base} is not in the Hugging Face cache and offline mode is on",
                f"download it once online (huggingface-cli download {base}), set HF_HOME to the cache holding it, "
                "or point model.base at a local directory")
        return None, None
    if not network:
        rep.add("base model", INFO, f"{base}: not cached; downloaded from the Hub at train time")
        return None, None
    try:
        from huggingface_hub import HfApi, hf_hub_download
        info = HfApi().model_info(base, revision=cfg.model.revision, timeout=15, files_metadata=False)
        cfg_path = hf_hub_download(base, "config.json", revision=cfg.model.revision)
        rep.add("base model", PASS, f"{base} on the Hub (commit {str(info.sha)[:10]}); weights download at train time")
        return json.loads(Path(cfg_path).read_text()), None
    except Exception as e:
        name = type(e).__name__
        fix = ("accept the model's terms on its Hub page and export HF_TOKEN (never put it in the config)"
               if "Gated" in name or "401" in str(e) or "403" in str(e) else
               "check the id's spelling (owner/name) and the network, or use a local directory")
        rep.add("base model", FAIL, f"{base}: {name}: {str(e).splitlines()[0][:200]}", fix)
        return None, None


def load_and_generate(cfg, rep: Report, path: Optional[str]) -> None:
    """--load: the base model in 4-bit (or as configured) on the configured device, one short generation."""
    if path is None:
        if cfg.model.base == "tiny":
            rep.add("load", INFO, "tiny model not built yet (train builds it); nothing to load")
            return
        if cfg.model.base.startswith("s3://"):
            rep.add("load", INFO, "s3:// model: load is checked by train after the copy to the local cache")
            return
        path = cfg.model.base
    t0 = time.time()
    try:
        import torch
        cuda = cfg.resources.device == "cuda"
        # the trainer's own loaders: trust_remote_code is passed from the config on every from_pretrained
        tok = load_tokenizer(path, cfg)
        model = load_model(path, cfg, "cuda:0" if cuda else "cpu")
        dev = next(model.parameters()).device
        ids = tok("The heart pumps", return_tensors="pt").to(dev)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
        mem = f", {torch.cuda.max_memory_allocated() / GB:.1f} GB peak" if cuda else ""
        rep.add("load", PASS, f"loaded {cfg.model.quantization} on {dev} in {time.time() - t0:.0f}s{mem}; generated {text!r}")
    except Exception as e:
        rep.add("load", FAIL, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "see the error; for CUDA errors fix the cuda row first; for out of memory use a smaller model")


# ---- memory estimate -----------------------------------------------------------------------------

_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def arch_dims(arch: dict[str, Any]) -> dict[str, int]:
    a = arch.get("text_config", arch) if isinstance(arch.get("text_config"), dict) else arch
    h = int(a.get("hidden_size") or a.get("n_embd") or a.get("d_model"))
    layers = int(a.get("num_hidden_layers") or a.get("n_layer") or a.get("num_layers"))
    heads = int(a.get("num_attention_heads") or a.get("n_head") or 1)
    kv = int(a.get("num_key_value_heads") or heads)
    head_dim = int(a.get("head_dim") or h // heads)
    return {"h": h, "layers": layers, "i": int(a.get("intermediate_size") or a.get("n_inner") or 4 * h),
            "vocab": int(a.get("vocab_size")), "q": heads * head_dim, "kv": kv * head_dim,
            "tied": bool(a.get("tie_word_embeddings", False))}


def estimate_memory(arch: dict[str, Any], tokens: int, lora_r: int, target_modules: Any,
                    gradient_checkpointing: bool, quantization: str = "nf4", compute_bytes: int = 2,
                    double_quant: bool = True, overhead_gb: float = 0.6) -> dict[str, float]:
    """Peak training memory in GB, by part: weights (NF4 ~0.5 byte/param for linear layers, embeddings and
    lm_head in the compute dtype), LoRA params+grads+Adam (fp32, 16 bytes each), activations for ``tokens``
    packed tokens (with checkpointing: each layer's input plus one layer recomputed), logits, overhead."""
    d = arch_dims(arch)
    h, L, i, V, q, kv = d["h"], d["layers"], d["i"], d["vocab"], d["q"], d["kv"]
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    linear = L * sum(a * b for a, b in shapes.values())
    embed = V * h * (1 if d["tied"] else 2)
    if quantization == "nf4":
        weights = linear * (4.127 if double_quant else 4.5) / 8 + embed * compute_bytes
    else:
        weights = (linear + embed) * compute_bytes
    mods = _ALL_LINEAR if target_modules == "all-linear" else [m.split(".")[-1] for m in target_modules]
    lora_params = L * sum(lora_r * sum(shapes.get(m, (h, h))) for m in mods)
    lora = lora_params * 16
    per_tok_layer = compute_bytes * (7 * h + 4 * i + 2 * kv + lora_r * len(mods)) + 8 * h
    if gradient_checkpointing:
        acts = L * tokens * h * compute_bytes + tokens * per_tok_layer
    else:
        acts = L * tokens * per_tok_layer
    logits = tokens * V * (8 + compute_bytes)
    overhead = overhead_gb * GB   # CUDA context, cuBLAS workspace
    total = (weights + lora + acts + logits + overhead) * 1.05
    return {"params_b": (linear + embed) / 1e9, "lora_params_m": lora_params / 1e6,
            "weights_gb": weights / GB, "lora_gb": lora / GB, "activations_gb": acts / GB,
            "logits_gb": logits / GB, "total_gb": total / GB}


def _fit_tokens(arch, cfg, hyper, mem_gb: float, compute_bytes: int) -> int:
    lo, hi = 64, hyper.tokens_per_micro_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        e = estimate_memory(arch, mid, hyper.lora.r, hyper.lora.target_modules,
                            cfg.train.gradient_checkpointing, cfg.model.quantization, compute_bytes, cfg.model.double_quant)
        lo, hi = (mid, hi) if e["total_gb"] <= mem_gb else (lo, mid - 1)
    return lo


def check_memory(cfg, rep: Report, arch: Optional[dict[str, Any]], cuda: dict[str, Any]) -> None:
    if arch is None:
        rep.add("memory", INFO, "no model config.json at hand: estimate skipped")
        return
    try:
        arch_dims(arch)
    except (TypeError, ValueError, KeyError):
        rep.add("memory", INFO, "unknown architecture keys in config.json: estimate skipped")
        return
    gpu = cfg.resources.device == "cuda"
    cb = 2 if gpu else 4
    if cfg.model.compute_dtype == "float32":
        cb = 4
    worst = None
    for dom in cfg.domains:
        hy = cfg.hyper_for(dom)
        e = estimate_memory(arch, hy.tokens_per_micro_batch, hy.lora.r, hy.lora.target_modules,
                            cfg.train.gradient_checkpointing, cfg.model.quantization, cb, cfg.model.double_quant,
                            0.6 if gpu else 0.1)
        if worst is None or e["total_gb"] > worst[1]["total_gb"]:
            worst = (dom, e, hy)
    dom, e, hy = worst
    params = f"{e['params_b']:.2f}B" if e["params_b"] >= 1 else f"{e['params_b'] * 1e3:.1f}M"
    detail = (f"~{e['total_gb']:.1f} GB peak ({params} params: weights {e['weights_gb']:.1f}, "
              f"LoRA {e['lora_params_m']:.1f}M params+grads+Adam {e['lora_gb']:.2f}, activations {e['activations_gb']:.1f} "
              f"for {hy.tokens_per_micro_batch} tokens, logits {e['logits_gb']:.1f}; "
              f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'})")
    if not gpu:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
        except (ValueError, OSError, AttributeError):
            ram = 0
        rep.add("memory", INFO, detail + (f" vs {ram:.0f} GB RAM" if ram else ""))
        return
    gpus = cuda.get("gpus") or []
    if gpus:
        small = min(gpus, key=lambda g: g["memory_gb"])
        mem, what = small["memory_gb"], f"smallest GPU {small['name']} {small['memory_gb']:.1f} GB"
    else:
        mem, what = REFERENCE_GPU_GB, f"reference {REFERENCE_GPU_GB:.0f} GB GPU (an RTX 3090; no GPU visible here)"
    if cfg.train.gradient_checkpointing and cfg.train.checkpoint_keep_last == "auto":
        detail += (f"; checkpoint_keep_last auto then keeps layers' activations up to "
                   f"{effective_budget_gb(cfg.train.memory_budget_gb, mem):.1f} GB (train.memory_budget_gb "
                   f"{cfg.train.memory_budget_gb:g}, at most 85% of the GPU)")
    if e["total_gb"] <= 0.8 * mem:
        rep.add("memory", PASS, f"{detail} fits the {what}")
        return
    fits = _fit_tokens(arch, cfg, hy, 0.9 * mem, cb)
    advice = []
    if fits >= 256:
        ga = max(1, round(hy.tokens_per_micro_batch * hy.grad_accum / fits))
        advice.append(f"lower train.tokens_per_micro_batch to {fits // 64 * 64} (and raise train.grad_accum to {ga} "
                      "to keep the batch)")
    if not cfg.train.gradient_checkpointing:
        advice.append("set train.gradient_checkpointing: true")
    if hy.lora.r > 8:
        advice.append("lower lora.r")
    if hy.lora.target_modules == "all-linear":
        advice.append("use lora.target_modules: [q_proj, v_proj]")
    advice.append("or use a smaller base model")
    status = WARN if e["total_gb"] <= 0.95 * mem else FAIL
    rep.add("memory", status, f"{detail} vs the {what}" + (f" (domain {dom})" if len(cfg.domains) > 1 else ""),
            "; ".join(advice))


# ---- entry points --------------------------------------------------------------------------------

def check_serving(cfg, rep: Report) -> None:
    """What vLLM's multi-LoRA serving will refuse of the adapters this config trains (a WARN: training works)."""
    problems = config_serving_warnings(cfg)
    if problems:
        rep.add("serving", WARN, "; ".join(problems), "change lora.* if the adapters are to be served with vLLM "
                "(docs/SERVING.md); `adapters serve` (PEFT) serves them all the same")
    else:
        rep.add("serving", PASS, "the adapters' LoRA shape is one vLLM's multi-LoRA serving loads")


def collect(cfg, load: bool = False, full: bool = True) -> Report:
    """Run the checks; full=False is the free pre-flight subset (no network, no Ray connect, no load)."""
    rep = Report()
    check_packages(rep, cfg)
    cuda = check_cuda(cfg, rep)
    check_torch_build(cfg, rep, cuda)
    check_bitsandbytes(cfg, rep, cuda)
    # the driver may be a CPU-only head node: then the cluster's GPUs are what count, so connect even in
    # pre-flight (bounded) rather than let Tune wait forever for GPUs that are not there
    remote_gpus = cfg.resources.device == "cuda" and not cuda.get("available") and bool(_ray_address(cfg))
    check_ray(cfg, rep, connect=full or remote_gpus)
    if full:
        check_output(cfg, rep)
    arch, path = check_model(cfg, rep, network=full and not _offline(cfg))
    check_memory(cfg, rep, arch, cuda)
    check_serving(cfg, rep)
    if load and full:
        if cfg.resources.device == "cuda" and not cuda.get("available"):
            rep.add("load", FAIL, "skipped: CUDA is not available", "fix the cuda row first")
        else:
            load_and_generate(cfg, rep, path)
    return rep


def run_doctor(cfg, load: bool = False) -> int:
    """Print the table; 0 when nothing FAILs, else 1."""
    rep = collect(cfg, load=load, full=True)
    print(rep.table())
    n = len(rep.failures)
    print(f"\n{n} check(s) failed" if n else "\nall checks passed (or only need a look: WARN/INFO)")
    return 1 if n else 0


def preflight(cfg) -> None:
    """The checks that cost nothing; raises UserFacingError naming each failure and its fix.
    When resources.device is cuda and CUDA cannot be initialised this fails with torch's own error text:
    there is no silent CPU fallback."""
    rep = collect(cfg, load=False, full=False)
    if rep.failures:
        lines = [f"- {c.name}: {c.detail}" + (f"\n    fix: {c.fix}" if c.fix else "") for c in rep.failures]
        raise UserFacingError("pre-flight checks failed (run `adapters doctor --config ...` for the full table):\n"
                              + "\n".join(lines))
    for c in rep.rows:
        if c.name == "serving" and c.status == WARN:   # trains fine; said now, not when someone tries to serve it
            logging.getLogger("pipeline.doctor").warning("the adapters will not load in vLLM as configured: %s (%s)",
                                                         c.detail, c.fix)
