"""Capacity decisions: what fits now, what an autoscaler can add, and what the train stage and doctor do
with it. The cluster configs are the project's own (cluster-aws.yaml, cluster.yaml); reading a live
cluster is tested in tests/integration/test_autoscale.py (Ray's fake autoscaler) and
test_job_submit.py (a head without one)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pipeline import doctor
from pipeline.capacity import Capacity, NodeType, assess, fits, node_types_from_config, trial_bundle
from pipeline.config import Config
from pipeline.errors import UserFacingError
from pipeline.train.schedule import check_resources, max_concurrent

ROOT = Path(__file__).resolve().parents[2]
CPU_HEAD = {"CPU": 8.0, "memory": 3e10, "node:__internal_head__": 1.0}
DOMAINS = ["debate", "medicine", "education", "ecology"]


def cfg(tmp_path, **resources) -> Config:
    return Config.model_validate({"output": str(tmp_path / "out"), "model": {"base": "tiny"}, "domains": DOMAINS,
                                  "resources": {"device": "cuda", **resources}})


def aws() -> Capacity:
    """cluster-aws.yaml right after `ray up`: the CPU head, no worker yet."""
    types, cap = node_types_from_config(yaml.safe_load((ROOT / "cluster-aws.yaml").read_text()))
    return Capacity(nodes=[CPU_HEAD], autoscaler="v1", node_types=types, max_workers=cap,
                    node_types_from="cluster-aws.yaml")


def test_fits_packs_per_node():
    assert fits({"CPU": 4, "GPU": 1}, {"CPU": 1, "GPU": 1}) == 1
    assert fits({"CPU": 8, "GPU": 4}, {"CPU": 1, "GPU": 1}) == 4
    assert fits({"CPU": 8, "GPU": 4}, {"CPU": 3, "GPU": 1}) == 2
    assert fits(CPU_HEAD, {"CPU": 1, "GPU": 1}) == 0
    # two half-GPU nodes are not one GPU: a trial's worker runs on one node
    assert Capacity(nodes=[{"CPU": 4, "GPU": 0.5}] * 2).slots_now({"CPU": 1, "GPU": 1}) == 0


def test_the_aws_cluster_scales_from_zero(tmp_path, caplog):
    cap = aws()
    assert {t.name for t in cap.node_types} == {"worker.g5", "worker.g6"}
    assert all(t.resources["GPU"] == 1 and t.min_workers == 0 for t in cap.node_types)
    v = assess(cap, cfg(tmp_path).resources, 4)
    assert v.state == "scale_up" and v.slots_now == 0
    assert v.slots_max == 8                             # 2 types x 8, within the cluster's max_workers 8
    assert "queued" in v.detail and "worker.g5" in v.detail
    with caplog.at_level(logging.INFO, logger="pipeline.train.schedule"):
        check_resources(cfg(tmp_path), cap)             # INFO, goes on: the queued trials make it scale
    assert "autoscaler can add nodes" in caplog.text
    assert max_concurrent(cfg(tmp_path), cap) == 4      # all domains queued, not "0 GPUs now" -> 1
    assert max_concurrent(cfg(tmp_path, max_concurrent_trials=2), cap) == 2   # the config's own cap wins


def test_cluster_wide_max_workers_bounds_the_growth(tmp_path):
    types = [NodeType(name="a", resources={"CPU": 4, "GPU": 1}, max_workers=8),
             NodeType(name="b", resources={"CPU": 8, "GPU": 2}, max_workers=8)]
    cap = Capacity(nodes=[CPU_HEAD], autoscaler="v1", node_types=types, max_workers=1)
    assert assess(cap, cfg(tmp_path).resources).slots_max == 2      # one node, the bigger type
    assert max_concurrent(cfg(tmp_path), cap) == 2
    unlimited = Capacity(nodes=[CPU_HEAD], autoscaler="v2", node_types=[types[0].model_copy(update={"max_workers": None})])
    v = assess(unlimited, cfg(tmp_path).resources)
    assert v.state == "scale_up" and v.slots_max is None and "as many as needed" in v.detail
    assert max_concurrent(cfg(tmp_path), unlimited) == 4


def test_workers_already_up_count_against_the_limits(tmp_path):
    types = [NodeType(name="gpu", resources={"CPU": 1, "GPU": 1}, max_workers=2)]
    one_up = Capacity(nodes=[{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}], autoscaler="v1", node_types=types,
                      max_workers=2, running={"gpu": 1})
    v = assess(one_up, cfg(tmp_path).resources)
    assert v.state == "ready" and v.slots_max == 2 and "1 trial(s) fit now, up to 2" in v.detail
    all_up = one_up.model_copy(update={"nodes": one_up.nodes + [{"CPU": 1.0, "GPU": 1.0}], "running": {"gpu": 2}})
    v = assess(all_up, cfg(tmp_path).resources)
    assert v.slots_max == 2 and v.detail.endswith("2 trial(s) fit now") and max_concurrent(cfg(tmp_path), all_up) == 2


def test_autoscaler_without_gpu_types_is_an_error_with_the_fix(tmp_path):
    cap = Capacity(nodes=[CPU_HEAD], autoscaler="v1", max_workers=4,
                   node_types=[NodeType(name="cpu.worker", resources={"CPU": 16}, max_workers=4)])
    v = assess(cap, cfg(tmp_path).resources)
    assert v.state == "impossible" and "worker types offer none" in v.detail
    with pytest.raises(UserFacingError, match="available_node_types.*resources.device: cpu"):
        check_resources(cfg(tmp_path), cap)
    # the same cluster is fine for CPU training: its workers add CPUs
    assert assess(cap, cfg(tmp_path, device="cpu", cpus_per_trial=12).resources).state == "scale_up"


def test_no_gpu_and_no_autoscaler_fails_at_once(tmp_path):
    cap = Capacity(nodes=[{"CPU": 2.0}])
    with pytest.raises(UserFacingError, match=r"0 GPU.*no autoscaler can add one.*resources.device: cpu"):
        check_resources(cfg(tmp_path), cap)
    check_resources(cfg(tmp_path, device="cpu", cpus_per_trial=0.5), cap)    # cpu: fits
    assert max_concurrent(cfg(tmp_path, device="cpu", cpus_per_trial=0.5), cap) == 4
    assert max_concurrent(cfg(tmp_path, device="cpu", cpus_per_trial=1), cap) == 2
    with pytest.raises(UserFacingError, match="cpus_per_trial"):
        check_resources(cfg(tmp_path, device="cpu", cpus_per_trial=4), cap)


def test_autoscaler_whose_types_are_not_visible_queues_all(tmp_path):
    """KubeRay: the autoscaler reports to GCS, its worker groups live in the RayCluster resource."""
    cap = Capacity(nodes=[CPU_HEAD], autoscaler="v1", node_types=None)
    v = assess(cap, cfg(tmp_path).resources, 4)
    assert v.state == "may_scale_up" and "ray status" in v.fix
    check_resources(cfg(tmp_path), cap)
    assert max_concurrent(cfg(tmp_path), cap) == 4


def test_gpus_present_now(tmp_path):
    one = Capacity(nodes=[{"CPU": 16.0, "GPU": 1.0}])                  # the 3090 workstation (cluster.yaml)
    assert assess(one, cfg(tmp_path).resources).state == "ready"
    assert max_concurrent(cfg(tmp_path), one) == 1
    grown = aws().model_copy(update={"nodes": [CPU_HEAD, {"CPU": 4.0, "GPU": 1.0}]})
    v = assess(grown, cfg(tmp_path).resources)
    assert v.state == "ready" and "up to" in v.detail
    assert max_concurrent(cfg(tmp_path), grown) == 4


def test_workstation_config_adds_nothing():
    types, cap = node_types_from_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    assert types == [] and cap == 0
    # a type left for the cloud provider to fill in (no resources) makes the types unknown, not empty
    assert node_types_from_config({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {}}, "w": {"node_config": {"InstanceType": "g5.xlarge"}, "max_workers": 2}}})[0] is None


def test_trial_bundle():
    r = Config.model_validate({"model": {"base": "tiny"}, "resources": {"device": "cuda", "cpus_per_trial": 3}}).resources
    assert trial_bundle(r) == {"CPU": 3.0, "GPU": 1.0}


@pytest.mark.parametrize("state,status", [("ready", "PASS"), ("scale_up", "INFO"), ("impossible", "FAIL")])
def test_doctor_row_follows_the_verdict(tmp_path, state, status):
    cap = {"ready": Capacity(nodes=[{"CPU": 4.0, "GPU": 1.0}]), "scale_up": aws(),
           "impossible": Capacity(nodes=[{"CPU": 4.0}])}[state]
    rep = doctor.Report()
    doctor.ray_row(cfg(tmp_path), rep, "10.0.0.1:6379", cap)
    row = rep.rows[-1]
    assert row.name == "ray" and row.status == status and row.detail.startswith("10.0.0.1:6379: ")
    assert bool(row.fix) == (state == "impossible")


def test_workers_per_trial_count_as_one_trial(tmp_path):
    """resources.workers_per_trial: 2 GPUs now hold one two-worker trial; one GPU holds none."""
    two = Capacity(nodes=[CPU_HEAD, {"CPU": 16, "GPU": 2}])
    c = cfg(tmp_path, workers_per_trial=2)
    v = assess(two, c.resources, 4)
    assert v.state == "ready" and v.slots_now == 1 and "for each of its 2 workers" not in v.detail
    assert max_concurrent(c, two) == 1
    one = Capacity(nodes=[CPU_HEAD, {"CPU": 16, "GPU": 1}])
    assert assess(one, c.resources, 4).state == "impossible"
    with pytest.raises(UserFacingError, match="for each of its 2 workers"):
        check_resources(c, one)
    # the AWS cluster grows by one-GPU nodes: 8 GPUs at most, so 4 two-worker trials
    assert assess(aws(), c.resources, 4).slots_max == 4
