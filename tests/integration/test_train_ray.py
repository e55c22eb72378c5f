"""run_train on a local Ray (2 CPUs, shared by the module): Tune trials over four domains, failures,
skip on re-run, a worker killed mid-run and resumed, incompatible resume, PEFT loading."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from pipeline.raycluster import WORKER_ENV
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield
    ray.shutdown()


def tensorboard_tags(path: Path) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, crc, event proto, crc)."""
    import struct
    from tensorboardX.proto import event_pb2
    data, i, tags = path.read_bytes(), 0, set()
    while i < len(data):
        n = struct.unpack("<Q", data[i:i + 8])[0]
        ev = event_pb2.Event()
        ev.ParseFromString(data[i + 12:i + 12 + n])
        tags.update(v.tag for v in ev.summary.value)
        i += 12 + n + 4
    return tags


def _state(store, cfg, d):
    return store.read_json(f"runs/{cfg.run_name}/domains/{d}.json")


def test_four_domains_one_fails_then_rerun_skips_finished(ray_local, tmp_path, monkeypatch):
    from peft import PeftModel
    from pipeline.train import run_train
    from pipeline.lm.model import load_model, resolve_base
    store = Store(str(tmp_path))
    write_sft(store)
    cfg = tiny_config(str(tmp_path), train__max_failures=0)
    monkeypatch.setenv("DOMAIN_ADAPTERS_FAULTS", "ecology:nan:6")
    res = run_train(cfg)
    assert {d: r["status"] for d, r in res.items()} == {
        "debate": "finished", "medicine": "finished", "education": "finished", "ecology": "failed"}
    assert "NonFiniteLossError" in res["ecology"]["error"] and "nan" in res["ecology"]["error"]
    assert _state(store, cfg, "ecology")["state"] == "failed"
    assert not store.exists("adapters/ecology")
    steps = [store.read_json(f)["step"] for f in store.list_files("runs/t/train/ecology", "train_state.json")]
    assert steps == [4]  # the checkpoint before the NaN; nothing from or after it
    for d in ("debate", "medicine", "education"):
        rep = store.read_json(f"adapters/{d}/training_report.json")
        assert rep["val_loss"] < rep["base_val_loss"], (d, rep["val_loss"], rep["base_val_loss"])
        assert "base_test_loss" not in rep   # the base model's test loss is the evaluation's (below)
        assert rep["tokens_per_s"] > 0 and rep["peak_memory_gb"] > 0 and rep["steps"] == cfg.train.max_steps
        assert [v["step"] for v in rep["history"]["val"]] == [6, 12]
        # every SFT row of the shards became an example, or is counted as left out (none here)
        assert rep["n_without_target"] == {"train": 0, "val": 0, "test": 0}
        assert sum(rep["n_examples"].values()) == store.read_table(f"data/sft/{d}").num_rows
        # start-up marks of the Ray path, in the order they happen (bench/startup.py prints them)
        st = rep["startup"]
        marks = [st[f"trial_start_to_{m}_s"] for m in ("worker_process", "worker_fn", "recipe", "first_step")]
        assert all(0 <= a <= b for a, b in zip(marks, marks[1:])) and marks[-1] < 600, st
        inside = [st[f"{m}_s"] for m in ("device_ready", "tokenizer_loaded", "model_loaded", "data_ready",
                                          "lora_ready", "setup_done", "first_step")]   # the recipe's own, from its start
        assert all(0 <= a <= b for a, b in zip(inside, inside[1:])), st
        assert 0 < rep["busy_share"] < rep["train_time_s"] / rep["wall_time_s"]  # the trial started before the recipe
        assert _state(store, cfg, d)["state"] == "finished"
        for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
            assert store.is_file(f"adapters/{d}/{f}"), f
    # loadable with PeftModel.from_pretrained on the base model
    base = load_model(resolve_base(cfg, store), cfg, "cpu")
    m = PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "debate"))
    assert m.peft_config["default"].r == cfg.lora.r
    # training does not evaluate: the eval stage does, on the finished adapters
    from pipeline.eval import run_eval_stage
    assert not store.exists("eval")
    run_eval_stage(cfg)
    matrix = store.read_json("eval/matrix.json")
    assert matrix["models"] == ["base", "debate", "medicine", "education"]
    for d in ("debate", "medicine", "education"):
        assert matrix["loss"][d][d] < matrix["loss"]["base"][d], d
    # the workers' metrics reached each domain's Tune trial every log_every steps: its result.json and its
    # TensorBoard event file carry them
    for d in ("debate", "ecology"):
        trial = next(p for p in (tmp_path / "runs/t/tune").glob(f"*/*domain={d}_*") if p.is_dir())
        results = [json.loads(x) for x in (trial / "result.json").read_text().splitlines() if x.strip()]
        steps = [r["step"] for r in results if r.get("train_loss") == r.get("train_loss") and "train_loss" in r]
        assert {2, 4}.issubset(steps), steps
        tags = tensorboard_tags(next(trial.glob("events.out.tfevents.*")))
        assert {"ray/tune/train_loss", "ray/tune/tokens_per_s", "ray/tune/step"} <= tags, tags
        if d == "debate":  # ecology failed (NaN) before its first evaluation
            assert "ray/tune/val_loss" in tags and any(r.get("val_loss", 0) > 0 for r in results)

    # each domain's tokenized examples are in the token cache, one file each, the same examples as tokenizing
    # the shards directly gives
    from pipeline.lm.data import read_split
    from pipeline.train.data import SFT_COLUMNS, Tokenize, collect, token_cache_key
    tokenize = Tokenize(cfg)
    for d in cfg.domains:
        assert store.list_files(f"data/tokens/{d}", ".parquet") == [f"data/tokens/{d}/{token_cache_key(store, d, cfg)}.parquet"]
        cached = collect([store.read_table(f"data/tokens/{d}").to_pydict()])
        direct = collect([tokenize(read_split(store, d, s, columns=SFT_COLUMNS).to_pydict()) for s in ("train", "val", "test")])
        assert {s: len(x) for s, x in cached.items()} == {s: len(x) for s, x in direct.items()} and len(direct["train"]) > 0
        assert all(list(a.input_ids) == list(b.input_ids) and list(a.labels) == list(b.labels)
                   for s in direct for a, b in zip(cached[s], direct[s])), d
    ecology_tokens = (tmp_path / "data/tokens/ecology").glob("*.parquet").__next__().stat().st_mtime_ns

    # re-run without faults: finished domains are skipped, the failed ones train (on the cached tokens)
    monkeypatch.delenv("DOMAIN_ADAPTERS_FAULTS")
    before = store.read_bytes("adapters/debate/adapter_model.safetensors")
    res2 = run_train(cfg)
    assert all(r["status"] == "finished" for r in res2.values()), {d: r.get("error") for d, r in res2.items()}
    assert all(res2[d].get("skipped") for d in ("debate", "medicine", "education"))
    assert not res2["ecology"].get("skipped")
    assert store.read_bytes("adapters/debate/adapter_model.safetensors") == before
    for d in cfg.domains:
        assert res2[d]["val_loss"] < res2[d]["base_val_loss"], d
    assert [p.stat().st_mtime_ns for p in (tmp_path / "data/tokens/ecology").glob("*.parquet")] == [ecology_tokens]


@pytest.mark.parametrize("ray_train", [False, True], ids=["own_worker", "ray_train"])
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_local, tmp_path, monkeypatch, ray_train):
    """Both ways a one-worker trial runs: its own worker (the default) and Ray Train's TorchTrainer (what trials
    of several workers use; resources.ray_train_for_one_worker)."""
    from pipeline.errors import UserFacingError
    from pipeline.train import run_train
    from pipeline.lm.data import read_split
    from pipeline.train.data import SFT_COLUMNS, Tokenize, collect
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.train.identity import settings_fingerprint
    store = Store(str(tmp_path / "ray"))
    write_sft(store, domains=["debate"])
    cfg = tiny_config(str(tmp_path / "ray"), domains=["debate"], train__checkpoint_every=3, train__max_failures=1,
                      train__eval_matrix=False)
    cfg.resources.ray_train_for_one_worker = ray_train
    monkeypatch.setenv("DOMAIN_ADAPTERS_FAULTS", "debate:crash:7")  # os._exit before step 7, first attempt only
    res = run_train(cfg)["debate"]
    assert res["status"] == "finished", res.get("error")
    assert store.exists("runs/t/faults/debate-crash-7")
    # the last checkpoint the controller had registered when the worker died (3 or 6)
    assert res["resumed_from_step"] in (3, 6)

    # the same config, uninterrupted, in-process, on the same examples
    ref_store = Store(str(tmp_path / "ref"))
    ref_cfg = cfg.model_copy(deep=True)
    ref_cfg.output = str(tmp_path / "ref")
    ref_store.upload_dir(tmp_path / "ray" / "base_model", "base_model")
    tokenize = Tokenize(cfg)
    batches = [tokenize(read_split(store, "debate", s, columns=SFT_COLUMNS).to_pydict())
               for s in ("train", "val", "test")]
    ref = train_domain(ref_cfg, "debate", collect(batches), LocalSession(str(tmp_path / "ref-ck"), resume=False),
                       fingerprint=settings_fingerprint(cfg, "debate"))
    assert [h["loss"] for h in res["history"]["train"]] == pytest.approx(
        [h["loss"] for h in ref["history"]["train"]], rel=1e-4)
    assert res["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)

    # another LoRA rank while the run's checkpoints are an unfinished attempt's (no finished adapter: a finished
    # one with other settings is trained again from step 0, tests/unit/test_train_schedule.py): refused before
    # any trial starts
    store.delete("adapters/debate")
    other = cfg.model_copy(deep=True)
    other.lora.r = 4
    with pytest.raises(UserFacingError, match=r"lora.r: checkpoint has 8, config has 4"):
        run_train(other)


def test_oom_on_a_worker_is_retried_then_reported_failed_with_its_cause(ray_local, tmp_path, monkeypatch):
    """Issue 7 item 9: an out-of-memory error (simulated) counts as a failure, FailureConfig retries
    it (max_failures=1: two attempts), then the domain is reported failed with the cause while the
    other domain finishes."""
    from pipeline.train import run_train
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate", "medicine"])
    cfg = tiny_config(str(tmp_path), domains=["debate", "medicine"], train__max_failures=1, train__eval_matrix=False)
    monkeypatch.setenv("DOMAIN_ADAPTERS_FAULTS", "medicine:oom:2")
    res = run_train(cfg)
    assert res["debate"]["status"] == "finished"
    assert res["medicine"]["status"] == "failed"
    assert "OutOfMemoryError" in res["medicine"]["error"] and "tokens_per_micro_batch" in res["medicine"]["error"]
    attempts = [f for f in store.list_files("runs/t/faults") if "medicine-oom-attempt" in f]
    assert len(attempts) == 2, attempts  # the first try and one retry
    state = store.read_json("runs/t/domains/medicine.json")
    assert state["state"] == "failed" and "OutOfMemoryError" in state["error"]
    assert not store.exists("adapters/medicine/training_report.json")


WORKER_WITHOUT_CUDA = r'''
import json, os, sys
sys.path.insert(0, "tests")
import ray
from fixtures_train import tiny_config, write_sft
from pipeline.raycluster import WORKER_ENV
from pipeline.storage import Store
from pipeline.train import run_train
out = sys.argv[1]
write_sft(Store(out), domains=["debate", "medicine"])
# two (fake) GPUs; DOMAIN_ADAPTERS_FAKE_GPU=1 lets a cuda trial compute on this CPU-only machine, except
# where the no_cuda fault makes its worker check CUDA for real (a node whose CUDA is unusable). WORKER_ENV
# as the module's ray_local and the pipeline's own Ray have it (a Ray that this script starts is used as it
# is: ensure_ray adds nothing to it); without it Ray Train's controller polls its workers every 2 s, not 0.5 s
ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {**WORKER_ENV, "DOMAIN_ADAPTERS_FAKE_GPU": "1", "TOKENIZERS_PARALLELISM": "false"}})
os.environ["DOMAIN_ADAPTERS_FAULTS"] = "medicine:no_cuda"
cfg = tiny_config(out, domains=["debate", "medicine"], train__max_steps=4, train__eval_matrix=False,
                  resources={"device": "cuda", "cpus_per_trial": 0.5, "gpus_per_trial": 1, "max_concurrent_trials": 2})
res = run_train(cfg)
print("RESULT " + json.dumps({d: {k: r.get(k) for k in ("status", "error", "device")} for d, r in res.items()}))
'''


def test_worker_without_cuda_fails_domain(tmp_path):
    """resources.device cuda and a worker on a node where CUDA is unusable: that domain fails with the
    node, the cause and the fix (no silent CPU fallback); the other domain trains."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DOMAIN_ADAPTERS_FAULTS")}
    r = subprocess.run([sys.executable, "-c", WORKER_WITHOUT_CUDA, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, (r.stdout + r.stderr)[-5000:]
    res = json.loads(line[len("RESULT "):])
    assert res["debate"]["status"] == "finished" and res["debate"]["device"] == "cpu"
    err = res["medicine"]["error"]
    assert res["medicine"]["status"] == "failed"
    assert err.startswith("CudaUnavailableError: resources.device is cuda but CUDA cannot be used on node "), err
    assert "set resources.device: cpu" in err and "nvidia-smi" in err
    store = Store(str(tmp_path))
    assert store.read_json("runs/t/domains/medicine.json")["state"] == "failed"
    assert not store.exists("adapters/medicine/training_report.json")


def tensorboard_steps(path: Path, tag: str) -> list[int]:
    """The steps at which a TensorBoard event file holds the scalar `tag`."""
    import struct
    from tensorboardX.proto import event_pb2
    data, i, steps = path.read_bytes(), 0, []
    while i < len(data):
        n = struct.unpack("<Q", data[i:i + 8])[0]
        ev = event_pb2.Event()
        ev.ParseFromString(data[i + 12:i + 12 + n])
        steps += [ev.step for v in ev.summary.value if v.tag == tag]
        i += 12 + n + 4
    return steps


def wandb_history(path: Path) -> tuple[list[dict], dict[str, str]]:
    """(history rows, {metric or glob: its x-axis metric}) of an offline W&B run file (run-*.wandb): W&B's record log (LevelDB's log format:
    32 KiB blocks of [crc32, length, type] framed chunks after a 7-byte header) of Record protos."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    i, buf, rows, axes = 7, b"", [], {}
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        if left < 7:
            i += left
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        buf += data[i + 7:i + 7 + n]
        i += 7 + n
        if kind in (1, 4):            # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
            elif rec.WhichOneof("record_type") == "metric" and rec.metric.step_metric:
                axes[rec.metric.name or rec.metric.glob_name] = rec.metric.step_metric
        elif kind == 0 and n == 0:
            break
    return rows, axes


def test_tracking_mlflow_and_wandb_log_against_the_training_step(ray_local, tmp_path, monkeypatch):
    """tracking.mlflow (a local file store, read back with MlflowClient) and tracking.wandb (offline, its run
    file read back) get every domain's metrics at the training step; TensorBoard's x-axis is that step too;
    the tracking credentials in the driver's environment appear in no file the run wrote."""
    from mlflow.tracking import MlflowClient
    from pipeline.train import run_train
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"], n=(32, 8, 8))
    uri = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789abcdef")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-token-0123456789")
    cfg = tiny_config(str(tmp_path), domains=["debate"], model__tiny__pretrain_steps=0, train__max_steps=6,
                      train__log_every=2, train__eval_every=3, train__checkpoint_every=6, eval__enabled=False,
                      tracking={"mlflow": {"tracking_uri": uri, "experiment": "adapters-test"},
                                "wandb": {"project": "adapters-test", "mode": "offline"}})
    res = run_train(cfg)
    assert res["debate"]["status"] == "finished", res["debate"].get("error")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("adapters-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.params.get("domain") == "debate"
    rid = runs[0].info.run_id
    train = client.get_metric_history(rid, "train_loss")
    # reports every log_every (2) steps and at every evaluation (eval_every 3): Tune's iterations would be 1, 2, 3, ...
    finite = [m for m in train if m.value == m.value]   # NaN: a report without it (the base model's losses)
    assert sorted({m.step for m in finite}) == [2, 3, 4, 6] and all(m.value > 0 for m in finite)
    assert {m.step for m in client.get_metric_history(rid, "val_loss") if m.value == m.value} >= {3, 6}
    assert {m.step for m in client.get_metric_history(rid, "tokens_per_s")} >= {2, 4, 6}
    assert {m.step for m in client.get_metric_history(rid, "lr")} >= {2, 4}
    assert client.list_artifacts(rid), "the trial's files were not attached"
    trial = next(p for p in (tmp_path / "runs/t/tune").glob("*/*domain=debate_*") if p.is_dir())
    assert sorted(set(tensorboard_steps(next(trial.glob("events.out.tfevents.*")), "ray/tune/train_loss"))) == [2, 3, 4, 6]
    # under the run's folder of a local output (the trial's folder is copied to the output when the trial ends,
    # before W&B has finished writing)
    files = sorted((tmp_path / "runs/t/wandb").glob("offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run file"
    # W&B's own service process writes the offline file; it may still be flushing the history when the run ends
    deadline = time.time() + 60
    while True:
        try:
            hist, axes = wandb_history(files[0])
        except Exception:   # noqa: BLE001 - a record still being written does not parse yet
            hist, axes = [], {}
        if {r["step"] for r in hist if "train_loss" in r} >= {2, 3, 4, 6} or time.time() > deadline:
            break
        time.sleep(1)
    assert axes.get("*") == "step", axes          # W&B's charts plot every metric against the training step
    assert sorted({r["step"] for r in hist if "train_loss" in r}) == [2, 3, 4, 6]
    assert any(r.get("val_loss", float("nan")) > 0 and r["step"] == 3 for r in hist)
    import ray
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"   # Ray's own logs, runtime_envs
    for p in list(tmp_path.rglob("*")) + list(logs.rglob("*")):
        if p.is_file() and p.stat().st_size < 50_000_000:
            data = p.read_bytes()
            assert b"wandb-key-0123456789abcdef" not in data and b"mlflow-token-0123456789" not in data, p
