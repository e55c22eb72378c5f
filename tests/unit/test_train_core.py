"""Train core on CPU without Ray: prompt masking, packing == unpacked loss, resume == uninterrupted,
incompatible resume, NaN loss. Tiny model (hidden 64), fixed seeds."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402
from pipeline.lm.data import IGNORE, Example, collate, plan_batches, tokenize_conversation  # noqa: E402
from pipeline.train.faults import FaultPlan, with_faults  # noqa: E402
from pipeline.lm.kernels import loss_sum  # noqa: E402
from pipeline.train.loop import (DomainRecipe, IncompatibleCheckpointError, NonFiniteLossError,  # noqa: E402
                                 check_compat, compat_record, train_domain)
from pipeline.train.sessions import LocalSession, UnsafeCheckpointError  # noqa: E402
from pipeline.lm.model import (DEFAULT_CHAT_TEMPLATE, add_lora, encode_conversation, load_model,  # noqa: E402
                                  load_tokenizer, prompt_tokens, resolve_base)
from pipeline.lm.tiny import ensure_tiny  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-core")
    cfg = tiny_config(str(out), model__tiny__pretrain_steps=10)
    store = Store(str(out))
    write_sft(store, domains=["debate", "medicine"], n=(40, 10, 10))
    ensure_tiny(cfg, store)
    tok = load_tokenizer(resolve_base(cfg, store), cfg)
    return cfg, store, tok


def examples(tok, domain: str, split_seed: int, n: int, max_len=128, mask=True):
    return [Example(*tokenize_conversation(tok, r["messages"], max_len, mask)[0])
            for r in sft_rows(domain, n, split_seed)]


def chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def data_for(tok, domain="debate"):
    return {"train": examples(tok, domain, 1, 40), "val": examples(tok, domain, 2, 10), "test": examples(tok, domain, 3, 10)}


def test_prompt_masking(env):
    cfg, _, tok = env
    # the tiny tokenizer has no chat template: it gets the documented default, the way serving will
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    p = prompt_tokens(tok, chat("Argue the plan side.", "")[:1])
    [(ids, labels)] = tokenize_conversation(tok, chat("Argue the plan side.", "The plan wins."), 128, mask_prompt=True)
    r = tok.encode("The plan wins.", add_special_tokens=False) + [tok.eos_token_id]
    assert ids[:len(p)] == p and ids[0] == tok.bos_token_id and ids[len(p):len(p) + len(r)] == r
    assert labels[: len(p)] == [IGNORE] * len(p)
    assert [x for x in labels if x != IGNORE] == r  # the answer and its EOS, nothing after it
    [(_, unmasked)] = tokenize_conversation(tok, chat("Argue the plan side.", "The plan wins."), 128, mask_prompt=False)
    assert unmasked == ids
    # truncation keeps a response part and never more than max_len tokens
    [(ids, labels)] = tokenize_conversation(tok, chat("word " * 200, "answer " * 200), 64, mask_prompt=True)
    assert len(ids) == 64 and any(x != IGNORE for x in labels)


def test_collate_targets_stay_inside_each_example(env):
    _, _, tok = env
    ex = examples(tok, "debate", 1, 3)
    b = collate(ex, [[0, 1, 2]], tok.pad_token_id)
    sid, tgt, pos = b["seq_ids"][0], b["targets"][0], b["position_ids"][0]
    for k in (1, 2, 3):
        idx = (sid == k).nonzero().flatten()
        assert pos[idx].tolist() == list(range(len(idx)))
        assert tgt[idx[-1]] == IGNORE  # last token of an example predicts nothing of the next one
    assert b["n_targets"] == sum(e.n_target_tokens for e in ex)


def test_plan_batches_packs_rows_within_seq_len():
    lengths = [50, 60, 30, 100, 20, 70, 10]
    plan = plan_batches(lengths, list(range(7)), rows=2, seq_len=128)
    seen = sorted(i for b in plan for row in b for i in row)
    assert seen == list(range(7))
    assert all(len(b) <= 2 and all(sum(lengths[i] for i in row) <= 128 for row in b) for b in plan)
    assert len(plan) == 2  # 340 tokens in 2 batches of 2 x 128
    assert plan_batches(lengths, list(range(7)), rows=2, seq_len=128, packing=False)[0] == [[0], [1]]


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_packed_loss_equals_unpacked(env, quant):
    cfg, store, tok = env
    cfg = cfg.model_copy(deep=True)
    cfg.model.quantization = quant
    torch.manual_seed(0)
    model = add_lora(load_model(resolve_base(cfg, store), cfg, "cpu"), cfg.hyper_for("debate").lora, cfg, False)
    # make LoRA non-zero so the adapter path matters too
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    ex = examples(tok, "debate", 1, 8) + examples(tok, "medicine", 1, 4)
    plan = plan_batches([len(e) for e in ex], list(range(len(ex))), rows=2, seq_len=128)
    assert any(len(row) > 1 for b in plan for row in b), "the test needs rows holding several examples"
    with torch.no_grad():
        packed = sum(float(loss_sum(model, collate(ex, b, tok.pad_token_id), "cpu")) for b in plan)
        single = sum(float(loss_sum(model, collate(ex, [[i]], tok.pad_token_id), "cpu")) for i in range(len(ex)))
        # the same examples padded to a common length, one per row
        padded = float(loss_sum(model, collate(ex, [[i] for i in range(len(ex))], tok.pad_token_id, 128), "cpu"))
        # the target-positions-only head equals the model's full logits
        b0 = collate(ex, plan[0], tok.pad_token_id)
        logits = model(input_ids=b0["input_ids"], position_ids=b0["position_ids"]).logits
        full = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), b0["targets"].view(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        assert math.isclose(float(full), float(loss_sum(model, b0, "cpu")), rel_tol=1e-5)
    n = sum(e.n_target_tokens for e in ex)
    assert math.isclose(packed / n, single / n, rel_tol=1e-5), (packed / n, single / n)
    assert math.isclose(padded / n, single / n, rel_tol=1e-5)


def _cfg_steps(cfg, **train):
    c = cfg.model_copy(deep=True)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def _run(cfg, tok, root, resume=True, faults=None):
    recipe = with_faults(DomainRecipe, FaultPlan.parse(faults, "debate"))
    return train_domain(cfg, "debate", data_for(tok), LocalSession(str(root), resume=resume), recipe)


def test_resume_equals_uninterrupted(env, tmp_path):
    cfg, _, tok = env
    cfg = _cfg_steps(cfg, max_steps=8, checkpoint_every=3, eval_every=4)
    full = _run(cfg, tok, tmp_path / "a", resume=False)
    # interrupted: the same run dies before step 7 (checkpoints at 3 and 6, and at 4: the first
    # evaluation, a new lowest val loss), then resumes
    with pytest.raises(SystemExit):
        _run(cfg, tok, tmp_path / "b", faults="debate:exit:7")
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint_00000003", "checkpoint_00000004", "checkpoint_00000006"]
    resumed = _run(cfg, tok, tmp_path / "b")
    assert resumed["resumed_from_step"] == 6 and full["resumed_from_step"] is None
    assert resumed["val_loss"] < resumed["base_val_loss"]
    assert [h["loss"] for h in resumed["history"]["train"]] == pytest.approx(
        [h["loss"] for h in full["history"]["train"]], rel=1e-5, abs=1e-6)
    for k in ("val_loss", "test_loss", "base_val_loss"):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5), k


def test_incompatible_resume_is_refused(env, tmp_path):
    cfg, _, tok = env
    cfg = _cfg_steps(cfg, max_steps=4, checkpoint_every=2, eval_every=4)
    with pytest.raises(SystemExit):
        _run(cfg, tok, tmp_path, faults="debate:exit:4")
    other = cfg.model_copy(deep=True)
    other.lora.r = 4
    with pytest.raises(IncompatibleCheckpointError, match=r"lora.r: checkpoint has 8, config has 4.*new run_name"):
        _run(other, tok, tmp_path)
    assert check_compat(compat_record(cfg, "debate"), compat_record(cfg, "debate"), "x") is None
    with pytest.raises(IncompatibleCheckpointError, match="model.base"):
        c2 = cfg.model_copy(deep=True)
        c2.model.base = "/elsewhere"
        check_compat(compat_record(cfg, "debate"), compat_record(c2, "debate"), "x")


def test_nan_loss_stops_without_saving(env, tmp_path):
    cfg, store, tok = env
    cfg = _cfg_steps(cfg, max_steps=6, checkpoint_every=2, eval_every=2)
    if store.exists("adapters"):
        store.delete("adapters")
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 3.*learning_rate"):
        _run(cfg, tok, tmp_path / "ck", faults="debate:nan:3")
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint_00000002"]  # nothing after the NaN
    assert not store.exists("adapters/debate")


def test_lora_gradients_unchanged_by_eval_on_cpu(env):
    """Evaluating on CPU between steps must not change the gradients through 4-bit layers
    (bitsandbytes repacks weights for CPU inference and then drops their autograd path)."""
    cfg, store, tok = env
    from pipeline.train.loop import evaluate
    ex = examples(tok, "debate", 1, 4)
    batch = collate(ex, [[0, 1], [2, 3]], tok.pad_token_id)
    grads = []
    for run_eval_first in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_model(resolve_base(cfg, store), cfg, "cpu"), cfg.hyper_for("debate").lora, cfg, False)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        if run_eval_first:
            evaluate(model, ex, rows=2, seq_len=128, pad_id=tok.pad_token_id, device="cpu")
        model.train()
        loss_sum(model, batch, "cpu").backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-4, atol=1e-7), n


def _overfit_run(cfg, tok, root, resume=True, faults=None, **train):
    """Training on debate, validated on medicine: the val loss is lowest at the first evaluation, then rises."""
    c = _cfg_steps(cfg, max_steps=16, eval_every=2, checkpoint_every=5, learning_rate=0.01, warmup_steps=0, **train)
    data = {"train": examples(tok, "debate", 1, 12), "val": examples(tok, "medicine", 2, 10),
            "test": examples(tok, "medicine", 3, 10)}
    recipe = with_faults(DomainRecipe, FaultPlan.parse(faults, "debate"))
    return train_domain(c, "debate", data, LocalSession(str(root), resume=resume), recipe)


def test_exported_adapter_is_the_lowest_val_loss_not_the_last(env, tmp_path):
    cfg, store, tok = env
    rep = _overfit_run(cfg, tok, tmp_path / "ck", resume=False)
    vals = {v["step"]: v["loss"] for v in rep["history"]["val"]}
    best = min(vals, key=vals.get)
    assert vals[16] > vals[best] and best < 16, vals  # the val loss rose after an early minimum
    assert rep["steps"] == 16 and rep["stopped_early"] is None
    assert rep["exported_step"] == best and f"at step {best}" in rep["export_reason"]
    assert rep["val_loss"] == pytest.approx(vals[best], rel=1e-6)  # measured again on the exported weights
    # the adapter on disk is that one: loaded onto the base model it gives the same val loss
    from pipeline.train.loop import evaluate
    from pipeline.lm.model import load_adapter_onto
    model = load_adapter_onto(load_model(resolve_base(cfg, store), cfg, "cpu"), str(store.local_path("adapters/debate")))
    val = examples(tok, "medicine", 2, 10)
    loss, _ = evaluate(model, val, rows=4, seq_len=128, pad_id=tok.pad_token_id, device="cpu")
    assert loss == pytest.approx(vals[best], rel=1e-5)
    saved = store.read_json("adapters/debate/training_report.json")
    assert saved["exported_step"] == best and saved["export_reason"] == rep["export_reason"]


def test_early_stopping_stops_after_patience_and_keeps_the_best(env, tmp_path):
    cfg, _, tok = env
    rep = _overfit_run(cfg, tok, tmp_path / "ck", resume=False, early_stopping_patience=3)
    vals = [v["step"] for v in rep["history"]["val"]]
    best = rep["exported_step"]
    assert vals == list(range(2, best + 3 * 2 + 1, 2)), vals  # three evaluations after the best, then stop
    assert rep["steps"] == best + 6 < 16
    assert "early stopping: 3 evaluations" in rep["stopped_early"]


def test_resume_keeps_the_best_adapter_of_before_the_crash(env, tmp_path):
    cfg, _, tok = env
    full = _overfit_run(cfg, tok, tmp_path / "a", resume=False)
    with pytest.raises(SystemExit):
        _overfit_run(cfg, tok, tmp_path / "b", faults="debate:exit:12")
    # checkpoints: every 5 steps, and at each evaluation that lowered the val loss
    assert f"checkpoint_{full['exported_step']:08d}" in os.listdir(tmp_path / "b")
    resumed = _overfit_run(cfg, tok, tmp_path / "b")
    assert resumed["resumed_from_step"] == 10
    assert resumed["exported_step"] == full["exported_step"] < 10
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)


def test_a_huge_text_is_cut_by_characters_before_tokenizing(env):
    """A 20 MB response (a record under data.max_record_chars can still be long) costs no more to
    tokenize than a long document, and the tokens kept are those that tokenizing the whole text and
    cutting by tokens keeps."""
    import time
    from pipeline.lm.data import cut_prompt_response
    _, _, tok = env
    prompt, head = "Summarize the card.", "The plan solves the harm because " * 40
    t0 = time.perf_counter()
    [(ids, labels)] = tokenize_conversation(tok, chat("x" * 5_000_000 + prompt, head + "evidence " * 2_500_000), 128, True)
    assert time.perf_counter() - t0 < 2.0
    assert len(ids) == 128 and any(x != IGNORE for x in labels)
    # 60k characters: long enough to be cut, short enough to tokenize whole for the reference
    long_prompt, long_response = "word " * 12_000 + prompt, head + "evidence " * 6_000
    [(full, trained)] = encode_conversation(tok, chat(long_prompt, long_response))
    s0 = trained.index(True)
    p, r = cut_prompt_response(full[:s0], full[s0:], 128)
    assert tokenize_conversation(tok, chat(long_prompt, long_response), 128, True) == [(p + r, [IGNORE] * len(p) + r)]


def _stored_checkpoint(root: Path, step: int, cut_short: bool = False) -> Path:
    d = root / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    for name in ("adapter.pt", "optimizer.pt", "scheduler.pt"):
        torch.save({"step": torch.tensor(step)}, d / name)
    (d / "rng.json").write_text(json.dumps({"torch": [0], "numpy": [], "python": []}))
    if cut_short:  # the upload was cut short by a kill: a truncated file
        (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:20])
    (d / "train_state.json").write_text(json.dumps({"step": step}))
    return d


def test_ray_session_resumes_from_a_stored_checkpoint_newer_than_rays_snapshot(tmp_path):
    """A driver killed after a worker uploaded checkpoints but before Ray's run snapshot named them:
    the newest complete one in storage is used; a truncated one is passed over; Ray's own is kept
    when it is the newest."""
    import ray.train
    from pipeline.train.sessions import RaySession
    store = Store(str(tmp_path / "out"))
    root = tmp_path / "out/runs/demo/train/debate"
    _stored_checkpoint(root, 10)
    _stored_checkpoint(root, 20)
    _stored_checkpoint(root, 30, cut_short=True)

    def session(ray_ckpt):
        s = RaySession.__new__(RaySession)  # outside a Ray Train worker: the checkpoint Ray would hand back
        s._ckpt, s.store, s.prefix = ray_ckpt, store, "runs/demo/train/debate"
        return s

    def step_of(d):
        return json.loads((Path(d) / "train_state.json").read_text())["step"]

    assert step_of(session(None).restore_dir()) == 20
    assert step_of(session(ray.train.Checkpoint.from_directory(str(root / "checkpoint_00000010"))).restore_dir()) == 20
    newer = _stored_checkpoint(tmp_path / "ray", 40)
    assert step_of(session(ray.train.Checkpoint.from_directory(str(newer))).restore_dir()) == 40
    assert [step for _, step in session(None)._stored_checkpoints()] == [30, 20, 10]



def test_store_session_keeps_the_best_by_val_loss_and_the_latest_and_resumes_from_the_newest_complete(tmp_path):
    """A one-worker trial's session (no Ray Train): checkpoints land in the run's storage, train_state.json
    last; the train.checkpoints_to_keep best by val loss and the latest are kept, as Ray's CheckpointConfig
    does; a retry resumes from the newest complete one (a truncated upload is passed over); every report
    reaches on_report."""
    from pipeline.train.loop import CHECKPOINT_SCORE, UNSCORED
    from pipeline.train.sessions import StoreSession
    store = Store(str(tmp_path / "out"))
    reports = []
    s = StoreSession(store, "demo", "debate", keep=2, score_key=CHECKPOINT_SCORE, on_report=reports.append)
    assert s.restore_dir() is None
    scores = {1: 5.0, 2: 1.0, 3: UNSCORED, 4: 2.0, 5: 0.5, 6: UNSCORED}
    for step, score in scores.items():
        src = _stored_checkpoint(tmp_path / "made", step)
        s.report({"step": step, CHECKPOINT_SCORE: score, "train_loss": 1.0 / step}, str(src))
    s.report({"step": 7, "train_loss": 0.1})   # a report without a checkpoint
    assert [r["step"] for r in reports] == [1, 2, 3, 4, 5, 6, 7]
    root = tmp_path / "out/runs/demo/train/debate"
    # the two lowest val losses (steps 5 and 2) and the latest (6)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00000002", "checkpoint_00000005",
                                                      "checkpoint_00000006"]
    assert s.checkpoint_file(5, "adapter.pt") is not None and s.checkpoint_file(4, "adapter.pt") is None

    def step_of(d):
        return json.loads((Path(d) / "train_state.json").read_text())["step"]

    assert step_of(s.restore_dir()) == 6
    cut = root / "checkpoint_00000006" / "optimizer.pt"
    cut.write_bytes(cut.read_bytes()[:20])   # a truncated file, as a kill mid-upload leaves it
    assert step_of(s.restore_dir()) == 5
    # an upload cut before its train_state.json: not a checkpoint at all
    part = _stored_checkpoint(tmp_path / "part", 9)
    (part / "train_state.json").unlink()
    store.upload_dir(part, "runs/demo/train/debate/checkpoint_00000009")
    assert step_of(s.restore_dir()) == 5

def test_first_step_does_not_wait_for_the_base_evaluation_and_the_base_loss_is_the_base_models(env, tmp_path):
    """The base model's val loss is measured after training (a whole-split evaluation before the first
    step delayed it by ~25 s on a 7B model, bench/NOTES.md); it is still the base model's loss, adapter off.
    Its test loss is not the recipe's to measure: the evaluation stage's (eval/matrix.json)."""
    cfg, store, tok = env
    calls = []

    class Recorded(DomainRecipe):
        def train_step(self):
            calls.append("train_step")
            super().train_step()

        def evaluate_base(self):
            calls.append("evaluate_base")
            super().evaluate_base()

    cfg = _cfg_steps(cfg, max_steps=3, eval_every=100, checkpoint_every=100, learning_rate=0.01, warmup_steps=0)
    data = data_for(tok)
    rep = train_domain(cfg, "debate", data, LocalSession(str(tmp_path), resume=False), Recorded)
    assert calls == ["train_step"] * 3 + ["evaluate_base"]
    from pipeline.train.loop import evaluate
    base = load_model(resolve_base(cfg, store), cfg, "cpu")
    loss, _ = evaluate(base, data["val"], rows=cfg.train.tokens_per_micro_batch // cfg.train.max_seq_length,
                       seq_len=cfg.train.max_seq_length, pad_id=tok.pad_token_id, device="cpu")
    assert rep["base_val_loss"] == pytest.approx(loss, rel=1e-5)
    assert rep["val_loss"] < rep["base_val_loss"]
    assert not {"base_test_loss", "base_test_ppl"} & set(rep)
    assert 0 < rep["busy_share"] < 1 and rep["busy_share"] == pytest.approx(
        rep["train_time_s"] / rep["wall_time_s"], rel=0.05)  # off Ray both clocks start with the recipe


class _RunsCode:
    """A pickle that runs a shell command when it is unpickled (what an attacker with write access to the
    output would put into a checkpoint)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "adapter.pt"])
def test_a_checkpoint_file_that_runs_code_when_unpickled_is_refused_and_nothing_runs(env, tmp_path, name):
    """Issue 23.1: a crafted file in the checkpoint a re-run resumes from: the domain fails with one line
    naming the file, and the payload never runs (rng.pt, the older versions' pickle, is refused unread)."""
    import pickle
    cfg, _, tok = env
    with pytest.raises(SystemExit):
        _overfit_run(cfg, tok, tmp_path / "ck", faults="debate:exit:7")
    latest = sorted((tmp_path / "ck").glob("checkpoint_*"))[-1]
    marker = tmp_path / "payload-ran"
    (latest / name).write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(UnsafeCheckpointError) as e:
        _overfit_run(cfg, tok, tmp_path / "ck")
    assert not marker.exists(), "unpickling the checkpoint ran its code"
    msg = str(e.value)
    assert name in msg and "\n" not in msg and "nothing in it was" in msg, msg


def test_a_crafted_checkpoint_in_storage_is_refused_not_passed_over(tmp_path):
    """The storage scan of RaySession (checkpoints newer than Ray's snapshot): a cut-short copy is passed
    over, but a file holding a code-running pickle fails the domain naming its storage URI, unrun."""
    import pickle
    from pipeline.train.sessions import RaySession
    store = Store(str(tmp_path / "out"))
    root = tmp_path / "out/runs/demo/train/debate"
    _stored_checkpoint(root, 10)
    bad = _stored_checkpoint(root, 20)
    marker = tmp_path / "payload-ran"
    (bad / "scheduler.pt").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    s = RaySession.__new__(RaySession)
    s._ckpt, s.store, s.prefix = None, store, "runs/demo/train/debate"
    with pytest.raises(UnsafeCheckpointError) as e:
        s.restore_dir()
    assert not marker.exists()
    assert store.uri_of("runs/demo/train/debate/checkpoint_00000020") in str(e.value) and "\n" not in str(e.value)


def test_examples_without_a_target_token_are_left_out_counted_and_logged(caplog):
    """An example none of whose tokens is trained (labels all IGNORE after the first) cannot be learnt from:
    collect leaves it out, counts it per split (the training report's n_without_target) and says so."""
    import pickle
    from pipeline.lm.data import IGNORE
    from pipeline.train.data import collect
    trained, untrained = ([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4]), ([1, 2, 3, 4], [1, IGNORE, IGNORE, IGNORE])
    rows = [("a", *trained, "train"), ("b", *untrained, "train"), ("c", *trained, "val"), ("d", *untrained, "test")]
    batch = {k: [r[i] for r in rows] for i, k in enumerate(("key", "input_ids", "labels", "split"))}
    with caplog.at_level("WARNING", logger="pipeline.train.data"):
        out = collect([batch], domain="debate")
    assert {s: len(v) for s, v in out.items()} == {"train": 1, "val": 1, "test": 0}
    assert out.without_target == {"train": 1, "val": 0, "test": 1}
    assert "debate: 1 train, 1 test examples left out" in caplog.text and "max_seq_length" in caplog.text
    back = pickle.loads(pickle.dumps(out))        # it crosses from the tokenization task to the worker
    assert back.without_target == out.without_target and back["train"][0].input_ids.tolist() == [1, 2, 3, 4]
    with caplog.at_level("WARNING", logger="pipeline.train.data"):
        caplog.clear()
        assert collect([batch | {"labels": [trained[1]] * 4}]).without_target == {"train": 0, "val": 0, "test": 0}
    assert "left out" not in caplog.text
