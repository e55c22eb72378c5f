"""Scale from zero GPUs, against Ray's own fake autoscaler (docs/CLUSTER.md, "What the tests run").

A head with no GPU is started with ``--autoscaling-config`` naming the ``fake_multinode`` provider and
one worker type offering ``{"GPU": 1}`` (min_workers 0, max_workers 2): Ray's autoscaler launches
those workers on this machine (as raylets under the head's temp dir) when trials wait for a GPU.
The demo's four domains then run with ``adapters run`` joining that cluster (RAY_ADDRESS, token auth),
``resources.device: cuda`` and ``resources.max_concurrent_trials: null``; the GPU worker nodes are
counted before (0) and after (> 0).

Not through ``ray job submit`` here: the fake worker nodes share the head's temp dir on this one
machine, and each node's runtime-env agent unpacks the job's working_dir into the same directory,
replacing it under the workers already running there (their cwd vanishes). On a real cluster every
node has its own disk; job submission itself is tested in test_job_submit.py.

The fake GPUs are resources, not devices: trial workers find no CUDA. DOMAIN_ADAPTERS_FAKE_GPU=1 in
their environment (the train loop's test hook) makes a ``resources.device: cuda`` trial compute on
the CPU while everything else (GPU requests, scheduling, scale-up) stays as on a real cluster. The
fake worker nodes are started by the head's autoscaler process, so they inherit the environment of
``ray start``, which sets it.

``ray.cluster_utils.AutoscalingCluster`` is not used: in Ray 2.60's wheel it reads a yaml the wheel
does not ship, and it runs ``ray stop --force``, which would kill every Ray on the machine. The head
is started by tests/fixtures_ray.start_head (own temp dir, token auth) and stopped by process id.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.fixtures_ray import ROOT, RayHead, free_port, start_head, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FAKE_GPU_ENV = "DOMAIN_ADAPTERS_FAKE_GPU"   # the train loop's test hook (see the module docstring)
MAX_GPU_WORKERS = 2
DOMAINS = ("debate", "medicine", "education", "ecology")
SETS = [  # as small as the demo goes; every stage and domain still runs for real
    "resources.device=cuda", "resources.max_concurrent_trials=null", "resources.cpus_per_trial=1",
    "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1",
    "train.eval_max_batches=1", "train.eval_matrix=false", "model.tiny.pretrain_steps=2",
    "data.max_sft_per_domain=24", "data.max_docs_per_source=24",
]


def autoscaling_config(gcs_port: int) -> dict:
    """A cluster config as `ray up` would bootstrap it, for the fake_multinode provider."""
    return {
        "cluster_name": "fake-gpu", "max_workers": MAX_GPU_WORKERS, "upscaling_speed": 2.0, "idle_timeout_minutes": 10,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu.worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 200 * 2**20},
                           "node_config": {}, "min_workers": 0, "max_workers": MAX_GPU_WORKERS},
        },
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


@contextlib.contextmanager
def autoscaling_head(tmp: Path, fake_gpu: bool = True) -> Iterator[RayHead]:
    """A head with the fake autoscaler (see the module docstring); fake_gpu=False: its GPU worker nodes
    have no usable CUDA and no test hook, as a GPU node with a CPU-only torch."""
    gcs_port = free_port()
    cfg_file = tmp / "autoscaling.yaml"
    cfg_file.write_text(yaml.safe_dump(autoscaling_config(gcs_port)))
    head = start_head(num_cpus=2, gcs_port=gcs_port, extra_args=[f"--autoscaling-config={cfg_file}"],
                      extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                 **({FAKE_GPU_ENV: "1"} if fake_gpu else {})})
    try:
        yield head
    finally:
        n = stop_cluster(head.temp_dir)
        print(f"stopped {n} processes of the fake autoscaling cluster at {head.temp_dir}")
        shutil.rmtree(head.temp_dir.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def fake_gpu_cluster(tmp_path_factory) -> Iterator[RayHead]:
    with autoscaling_head(tmp_path_factory.mktemp("autoscale")) as head:
        yield head


NODES = """
import json, ray
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
print("@@" + json.dumps([{{"alive": n["Alive"], "gpu": n["Resources"].get("GPU", 0)}} for n in ray.nodes()]))
"""


def gpu_nodes(head: RayHead) -> tuple[int, int]:
    """(GPU nodes alive now, GPU nodes that ever joined) as the GCS lists them."""
    r = subprocess.run([sys.executable, "-c", NODES.format(address=head.address)], env=head.env,
                       capture_output=True, text=True, timeout=120)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("@@")), None)
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    nodes = [n for n in json.loads(line[2:]) if n["gpu"] > 0]
    return sum(n["alive"] for n in nodes), len(nodes)


def test_doctor_sees_the_autoscaler(fake_gpu_cluster: RayHead, tmp_path: Path) -> None:
    """No GPU yet, an autoscaler that adds GPU workers: the ray row is INFO, nothing FAILs."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--config", "configs/demo.yaml",
                        "--output", str(tmp_path / "o"), "--set", "resources.device=cuda"],
                       env={**fake_gpu_cluster.env, "RAY_ADDRESS": fake_gpu_cluster.address}, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    row = next((ln for ln in r.stdout.splitlines() if ln.startswith("ray ")), "")
    assert r.returncode == 0 and "INFO" in row, r.stdout + r.stderr
    assert f"autoscaler can add nodes for {MAX_GPU_WORKERS} trial(s)" in row and "gpu.worker" in row, row


def test_demo_scales_from_zero_gpus(fake_gpu_cluster: RayHead, tmp_path: Path) -> None:
    head = fake_gpu_cluster
    alive, ever = gpu_nodes(head)
    assert (alive, ever) == (0, 0), "the cluster must start without GPU nodes"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml", "--output", str(out)]
    for s in SETS:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, env={**head.env, "RAY_ADDRESS": head.address}, cwd=str(ROOT), capture_output=True,
                       text=True, timeout=600)
    wall = time.time() - t0
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-8000:]
    alive, ever = gpu_nodes(head)
    print(f"GPU worker nodes: 0 before; {ever} launched by the autoscaler ({alive} alive at the end); "
          f"job {wall:.0f}s")
    assert 0 < ever <= MAX_GPU_WORKERS
    # the train stage queued every domain for what the cluster can grow to (2 GPU workers), instead of
    # stopping at "0 GPUs". Seen here: no GPU worker yet when training starts. Ray Data's rate-based
    # autoscaling may also ask for CPU bundles while prepare runs, which only the GPU worker type can
    # hold here; then the line says how many trials fit already, and the totals must still be the grown ones.
    line = re.search(r"(no GPU for a trial now|the Ray cluster has \d+ node\(s\)[^\n]*trial\(s\) fit now)[^\n]*", log)
    assert line, log[-8000:]
    assert re.search(r"the autoscaler can add nodes for 2 trial\(s\) at once: 4 trial\(s\) are queued|"
                     r"1 trial\(s\) fit now, up to 2 once the autoscaler adds nodes|2 trial\(s\) fit now$",
                     line.group(0)), line.group(0)
    print(f"train stage: {line.group(0)}")
    for d in DOMAINS:
        rep = json.loads((out / "adapters" / d / "training_report.json").read_text())
        assert rep["status"] == "finished", (d, rep)
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary


# ---- trials that cannot start (issue 23, item 7) ----------------------------------------------------------

def _run(head: RayHead, out: Path, *sets: str, timeout: float = 600) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml", "--output", str(out),
           "--domains", "debate"]
    for s in [*SETS, *sets]:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, env={**head.env, "RAY_ADDRESS": head.address}, cwd=str(ROOT), capture_output=True,
                       text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr, time.time() - t0


def test_a_gpu_node_without_cuda_fails_the_domain_at_the_cuda_check(tmp_path: Path) -> None:
    """The autoscaler adds a GPU node whose torch has no CUDA (no test hook there). The one-worker trial
    sets up no NCCL process group (was: "Distributed package doesn't have NCCL built in" inside Ray Train,
    then the worker group restarted every 60 s without end); the worker's own CUDA check names the node."""
    with autoscaling_head(tmp_path, fake_gpu=False) as head:
        rc, log, wall = _run(head, tmp_path / "out")
        alive, ever = gpu_nodes(head)
    assert rc == 1, log[-8000:]
    assert ever >= 1, "the trial must have waited for a GPU node the autoscaler added"
    tail = log.strip().splitlines()[-3:]
    assert tail[0] == "error: 1 of 1 domain(s) did not finish:" and tail[1].split()[:2] == ["debate", "failed:"], log[-8000:]
    assert "resources.device is cuda but CUDA cannot be used on node" in tail[1], tail[1]
    assert "NCCL" not in log, log[-8000:]
    print(f"no-CUDA GPU node: the domain failed at the CUDA check; run {wall:.0f}s")


def test_workers_that_cannot_be_placed_fail_after_the_start_timeout(tmp_path: Path) -> None:
    """The cluster's one GPU (a head with --num-gpus=1, no autoscaler) is held by another job's actor:
    the trial's worker waits for it resources.worker_start_timeout_s, then the domain fails naming the
    resource (was: Ray Train restarted the worker group every 60 s, without end)."""
    head = start_head(num_cpus=2, extra_args=["--num-gpus=1"], extra_env={FAKE_GPU_ENV: "1"})
    try:
        blocker = subprocess.Popen([sys.executable, "-c", BLOCKER.format(address=head.address)], env=head.env,
                                   cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            seen = []
            for line in blocker.stdout:   # until it holds the GPU, or ends
                seen.append(line)
                if line.startswith("@@holding"):
                    break
            assert seen and seen[-1].startswith("@@holding"), "".join(seen)[-3000:]
            timeout_s = 20
            rc, log, wall = _run(head, tmp_path / "out", f"resources.worker_start_timeout_s={timeout_s}", timeout=420)
        finally:
            blocker.kill()
    finally:
        stop_cluster(head.temp_dir)
        shutil.rmtree(head.temp_dir.parent, ignore_errors=True)
    assert rc == 1, log[-8000:]
    tail = log.strip().splitlines()[-3:]
    assert tail[1].split()[:2] == ["debate", "failed:"], log[-8000:]
    assert re.search(rf"the trial's 1 worker\(s\) could not be placed within resources.worker_start_timeout_s="
                     rf"{timeout_s}s: each waited for \{{CPU [0-9.]+, GPU 1\}} on one node \(free now: .*'GPU': 0", tail[1]), tail[1]
    print(f"unplaceable worker: the domain failed after the {timeout_s}s start timeout; run {wall:.0f}s")


BLOCKER = """
import time, ray
ray.init(address="{address}", logging_level="ERROR", log_to_driver=False)
@ray.remote(num_gpus=1, num_cpus=0)
class Hold:
    def ping(self):
        return 1
h = Hold.remote()
ray.get(h.ping.remote())
print("@@holding", flush=True)
time.sleep(3600)
"""
