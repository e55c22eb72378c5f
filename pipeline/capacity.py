"""What the Ray cluster has now and what its autoscaler can add: the one place that reads capacity.

    read_capacity() -> Capacity          the connected cluster (ray.init done); cheap, no side effects
    trial_bundle(resources) -> dict      what one domain trial's training worker asks for
    assess(capacity, resources, trials) -> Verdict
                                         ready (fits now) | scale_up (the autoscaler can add it) |
                                         may_scale_up (an autoscaler runs, its node types are not
                                         visible here) | impossible (nothing can add it: the fix)

The train stage (schedule.check_resources / max_concurrent) and `adapters doctor` both decide from
``assess``, so "no GPU now, autoscaler present" means the same everywhere: trials are queued and
the pending ``{"GPU": 1}`` requests are what the autoscaler reacts to.

Ray 2.60 has no public API for an autoscaler's node types, so this reads what Ray's own tools read:

- now: ``ray.nodes()`` (the resources of each alive node; a trial's worker must fit on one node);
- whether an autoscaler runs: what ``ray status`` shows. The v1 monitor writes its report to GCS
  internal KV (``__autoscaling_status``); a head started without ``--autoscaling-config`` runs the
  same monitor with a read-only provider whose node types are named ``node_<node id>``
  (``ray.autoscaler._private.util.format_readonly_node_type``): that is no autoscaler. The v2
  autoscaler (KubeRay ``autoscalerOptions.version: v2``) is asked with ``ray.autoscaler.v2.sdk``;
- the node types an autoscaler may launch (resources, max_workers), first found of:
  1. the cluster config an autoscaler reported to GCS (``ray._private.state.state.get_cluster_config()``,
     which Ray Data reads; Ray 2.60's autoscalers leave it empty, later v2 autoscalers report it);
  2. the autoscaling config file the head's monitor was started with (``--autoscaling-config`` on
     its command line, matched by GCS port), when the driver runs on the head (a submitted job does);
  3. ``~/ray_bootstrap_config.yaml``, the cluster launcher's copy on the head (Ray Tune checks the
     same file to tell an autoscaling cluster).
  KubeRay keeps the worker groups in the RayCluster resource, which a job cannot read: there the
  autoscaler is seen, its node types are not (``node_types`` is None, the verdict may_scale_up).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

# format_readonly_node_type(node_id) in ray.autoscaler._private.util: the monitor's read-only provider
_READONLY_NODE_TYPE = re.compile(r"^node_[0-9a-f]{20,}$")
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class NodeType(BaseModel):
    """A worker node type an autoscaler may launch."""
    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: Optional[int] = None   # None: no limit of its own (the cluster-wide one still applies)


class Capacity(BaseModel):
    """The cluster now and, when an autoscaler runs, what it may launch (read_capacity builds it; doctor's
    subprocess sends it back as JSON)."""
    nodes: list[dict[str, float]] = Field(description="resources of each alive node now")
    autoscaler: Optional[Literal["v1", "v2"]] = None
    node_types: Optional[list[NodeType]] = Field(None, description="None: not readable from here")
    max_workers: Optional[int] = Field(None, description="cluster-wide cap on worker nodes, if known")
    node_types_from: Optional[str] = None
    running: dict[str, int] = Field(default_factory=dict,
                                    description="worker nodes per type that are up now (launches under way are not)")

    @property
    def resources(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for n in self.nodes:
            for k, v in n.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def slots_now(self, bundle: dict[str, float]) -> int:
        return sum(fits(n, bundle) for n in self.nodes)

    def slots_addable(self, bundle: dict[str, float]) -> Optional[float]:
        """How many more bundles the autoscaler can make room for: None when its node types are unknown,
        math.inf when nothing limits them. Each type up to its max_workers less its nodes already up (those
        are in `nodes`; a launch under way is still to come), the types with the most bundles per node first,
        within the cluster-wide max_workers."""
        if self.node_types is None:
            return None
        per_node = sorted(((fits(t.resources, bundle), t) for t in self.node_types), key=lambda x: x[0], reverse=True)
        budget = (self.max_workers - sum(self.running.values())) if self.max_workers is not None else math.inf
        total = 0.0
        for k, t in per_node:
            if k == 0 or budget <= 0:
                continue
            room = (t.max_workers - self.running.get(t.name, 0)) if t.max_workers is not None else math.inf
            n = max(0.0, min(budget, room))
            total += k * n
            budget -= n
        return total

    def describe(self) -> str:
        res = self.resources
        out = f"{len(self.nodes)} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
        if self.autoscaler:
            out += f"; autoscaler {self.autoscaler}"
            if self.node_types is not None:
                out += " (worker types: " + (", ".join(
                    f"{t.name} {_fmt(t.resources)} x{t.max_workers if t.max_workers is not None else 'any'}"
                    + (f", {self.running[t.name]} up" if self.running.get(t.name) else "")
                    for t in self.node_types) or "none") + ")"
        return out


class Verdict(BaseModel):
    state: Literal["ready", "scale_up", "may_scale_up", "impossible"]
    slots_now: int
    slots_max: Optional[int] = Field(description="trials the cluster can hold at once, grown; None: unknown or unbounded")
    detail: str
    fix: str = ""


def fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of bundle fit on one node."""
    counts = [int(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 0


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())
                           if not k.startswith(("node:", "accelerator_type:")) and k not in (
                               "memory", "object_store_memory")) + "}"


def trial_bundle(resources) -> dict[str, float]:
    """What one domain trial's training worker asks for (schedule.py's per-worker resources plus the
    trial's own sliver of CPU: together cpus_per_trial)."""
    b = {"CPU": float(resources.cpus_per_trial)}
    if resources.device == "cuda":
        b["GPU"] = float(resources.gpus_per_trial)
    return b


# ---- reading -------------------------------------------------------------------------------------

def node_types_from_config(config: dict[str, Any]) -> tuple[Optional[list[NodeType]], Optional[int]]:
    """(worker node types, cluster-wide max_workers) from a cluster launcher / autoscaling config.
    A type without ``resources`` (left for the cloud provider to fill in) makes the list unknown."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    out = []
    for name, t in types.items():
        if name == head:
            continue
        if not isinstance(t, dict) or t.get("resources") is None:
            return None, config.get("max_workers")
        out.append(NodeType(name=name, resources={k: float(v) for k, v in t["resources"].items()},
                            min_workers=int(t.get("min_workers") or 0),
                            max_workers=t.get("max_workers")))
    return out, config.get("max_workers")


def _from_gcs_cluster_config() -> tuple[Optional[list[NodeType]], Optional[int]]:
    import ray._private.state
    cc = ray._private.state.state.get_cluster_config()
    if cc is None or not cc.node_group_configs:
        return None, None
    out = [NodeType(name=g.name, resources=dict(g.resources), min_workers=max(0, g.min_count),
                    max_workers=None if g.max_count == -1 else g.max_count)
           for g in cc.node_group_configs if g.max_count != 0]
    return out, None


def _monitor_config_path(gcs_port: int) -> Optional[Path]:
    """The --autoscaling-config of this cluster's monitor, when it runs on this machine."""
    import psutil
    for p in psutil.process_iter(["cmdline"]):
        try:
            args = p.info["cmdline"] or []
        except psutil.Error:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") or a.endswith("autoscaler/v2/monitor.py")
                   for a in args[:3]):
            continue
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if opts.get("gcs-address", "").rpartition(":")[2] == str(gcs_port) and opts.get("autoscaling-config"):
            return Path(opts["autoscaling-config"]).expanduser()
    return None


def _read_yaml(path: Path) -> Optional[dict]:
    import yaml
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        log.debug("cannot read autoscaling config %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def _autoscaler_from_status(gcs_address: str) -> tuple[Optional[str], dict[str, int]]:
    """('v2' | 'v1' | None, worker nodes per type that are up) from what the autoscaler reports to GCS; None
    when no autoscaler reports (the read-only monitor of a head started without one names its types
    after node ids)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status
        st = get_cluster_status(gcs_address)
        up = [n.ray_node_type_name for n in st.active_nodes + st.idle_nodes]
        names = set(up) | {n.ray_node_type_name for n in st.pending_nodes} | {r.ray_node_type_name for r in st.pending_launches}
        running = {k: up.count(k) for k in set(up)}
    else:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        running = {}
        for part in ("active_nodes", "idle_nodes"):
            for k, n in (report.get(part) or {}).items():
                running[k] = running.get(k, 0) + int(n)
        names = set(running) | set(report.get("pending_launches") or {})
    if not any(k and not _READONLY_NODE_TYPE.match(k) for k in names):
        return None, {}
    return ("v2" if is_autoscaler_v2() else "v1"), running


def _node_types(gcs_port: int, autoscaler_seen: bool) -> tuple[Optional[list[NodeType]], Optional[int], Optional[str]]:
    """(worker node types, cluster-wide max_workers, where they were read), first found of: the cluster config
    in GCS, this cluster's monitor's --autoscaling-config, ~/ray_bootstrap_config.yaml (only when an
    autoscaler reports: a stale copy must not invent one)."""
    try:
        types, cap = _from_gcs_cluster_config()
        if types is not None:
            return types, cap, "the cluster config in GCS"
    except Exception as e:  # noqa: BLE001 - private API: absent or changed means "not known"
        log.debug("GCS cluster config not readable: %s", e)
    path = _monitor_config_path(gcs_port)
    if path is None and autoscaler_seen and Path(BOOTSTRAP_CONFIG).expanduser().is_file():
        path = Path(BOOTSTRAP_CONFIG).expanduser()
    config = _read_yaml(path) if path is not None else None
    if config is None:
        return None, None, None
    types, cap = node_types_from_config(config)
    return types, cap, str(path)


def read_capacity() -> Capacity:
    """The connected cluster's capacity now and what its autoscaler may add (see the module doc)."""
    import ray
    nodes = [{k: float(v) for k, v in (n.get("Resources") or {}).items()} for n in ray.nodes() if n.get("Alive")]
    gcs_address = ray.get_runtime_context().gcs_address
    try:
        autoscaler, running = _autoscaler_from_status(gcs_address)
    except Exception as e:  # noqa: BLE001 - a status we cannot read is "no autoscaler seen"
        log.debug("autoscaler status not readable: %s", e)
        autoscaler, running = None, {}
    types, cap, source = _node_types(int(gcs_address.rpartition(":")[2]), autoscaler is not None)
    if source is not None:   # an autoscaling config in use means an autoscaler, reported yet or not
        autoscaler = autoscaler or ("v2" if source == "the cluster config in GCS" else "v1")
    if autoscaler is None:
        return Capacity(nodes=nodes)
    names = {t.name for t in types} if types is not None else None
    return Capacity(nodes=nodes, autoscaler=autoscaler, node_types=types, max_workers=cap, node_types_from=source,
                    running={k: n for k, n in running.items() if names is None or k in names})


# ---- deciding ------------------------------------------------------------------------------------

def assess(cap: Capacity, resources, trials: int = 1) -> Verdict:
    """Can the domain trials run here, now or once the autoscaler has added nodes?"""
    bundle = trial_bundle(resources)
    what = "GPU" if "GPU" in bundle else "CPU"
    workers = resources.workers_per_trial   # a trial's workers may sit on different nodes
    need = f"a trial needs {_fmt(bundle)} on one node" + (f" for each of its {workers} workers" if workers > 1 else "")
    now = cap.slots_now(bundle) // workers
    add = cap.slots_addable(bundle) if cap.autoscaler else 0.0
    if add is not None and not math.isinf(add):
        add = (cap.slots_now(bundle) % workers + int(add)) // workers
    slots_max = None if add is None or math.isinf(add) else now + int(add)
    where = f"the Ray cluster has {cap.describe()}"
    if now >= 1:
        more = ("" if slots_max == now else f", up to {slots_max} once the autoscaler adds nodes" if slots_max
                else ", more once the autoscaler adds nodes")
        return Verdict(state="ready", slots_now=now, slots_max=slots_max, detail=f"{where}: {now} trial(s) fit now{more}")
    if add is None:
        return Verdict(state="may_scale_up", slots_now=0, slots_max=None,
                       detail=f"no {what} for a trial now ({where}; {need}); an autoscaler runs but its node types "
                              f"cannot be read from here (KubeRay keeps them in the RayCluster): {trials} trial(s) "
                              "are queued for it to add nodes",
                       fix="if no node comes up, check `ray status` on the head and the autoscaler's worker "
                           f"groups (one with {what} resources and maxReplicas > 0)")
    if add > 0:
        room = "as many as needed" if slots_max is None else f"{slots_max} trial(s) at once"
        return Verdict(state="scale_up", slots_now=0, slots_max=slots_max,
                       detail=f"no {what} for a trial now ({where}; {need}); the autoscaler can add nodes for "
                              f"{room}: {trials} trial(s) are queued and nodes come up as they wait")
    if what == "GPU":
        fix = ("start Ray on GPU nodes (check `nvidia-smi` and that torch sees CUDA; `ray start --num-gpus=N`), "
               "or give the cluster an autoscaler with a GPU worker type (available_node_types.<name>.resources "
               "{GPU: 1} and max_workers > 0, as in cluster-aws.yaml; a KubeRay worker group with nvidia.com/gpu), "
               "or set resources.device: cpu to train on CPUs")
    else:
        fix = (f"lower resources.cpus_per_trial (now {resources.cpus_per_trial:g}) or add CPUs "
               "(resources.num_cpus for a local Ray; bigger nodes or an autoscaler for a cluster)")
    grow = ("; its autoscaler's worker types offer none that fits" if cap.autoscaler else
            "; no autoscaler can add one")
    return Verdict(state="impossible", slots_now=0, slots_max=0,
                   detail=f"resources.device is {resources.device} but {where}: {need}{grow}", fix=fix)
