"""`adapters status`: each domain's state, read from what is in the output tree (local or s3://).

    runs/<run_name>/domains/<domain>.json     {"domain", "state", "error", "updated", "val_loss", "adapter_uri"}
    adapters/<domain>/training_report.json     exists only for a finished adapter (val_loss, ...)
    data/_SUCCESS, data/manifest.json          the data stage
    data/download_manifest.json                the download stage
    report/summary.json                        the report

With a config, its run_name and domains are used. With only --output, the domains shown are the
default four plus any found in the tree, and every run's state files are read (the newest state of a
domain wins). Exit status: 0 when the output could be read (whatever the states), 1 when it is
missing or unreadable.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from pipeline.config import DOMAINS


def _fmt_loss(x: Any) -> str:
    try:
        return f"{float(x):.4f}"
    except (TypeError, ValueError):
        return "?"


def _age(ts: Any) -> str:
    if not ts:
        return ""
    try:
        if isinstance(ts, (int, float)):
            t = datetime.fromtimestamp(float(ts), timezone.utc)
        else:
            t = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
            if t.tzinfo is None:
                t = t.replace(tzinfo=timezone.utc)
        s = (datetime.now(timezone.utc) - t).total_seconds()
    except (ValueError, OverflowError, OSError):
        return str(ts)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def _ts_key(ts: Any) -> float:
    try:
        if isinstance(ts, (int, float)):
            return float(ts)
        t = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _read_json(store, rel: str) -> Optional[dict]:
    try:
        if not store.is_file(rel):
            return None
        d = store.read_json(rel)
        return d if isinstance(d, dict) else None
    except (ValueError, OSError, Exception):
        return {"_unreadable": True}


def collect_status(store, run_name: Optional[str], domains: Optional[list[str]]) -> dict[str, Any]:
    """{'stages': {...}, 'domains': {domain: {'state', 'detail', ...}}} from an output Store."""
    files = store.list_files("runs", suffix=".json")
    states: dict[str, list[tuple[str, dict]]] = {}
    for rel in files:
        parts = rel.split("/")   # runs/<run>/domains/<domain>.json
        if len(parts) == 4 and parts[2] == "domains" and (run_name is None or parts[1] == run_name):
            d = _read_json(store, rel)
            if d is not None:
                states.setdefault(parts[3][:-5], []).append((parts[1], d))
    adapters = {r.split("/")[1] for r in store.list_files("adapters", suffix="training_report.json")
                if len(r.split("/")) == 3}
    if domains is None:
        domains = list(DOMAINS) + sorted((set(states) | adapters) - set(DOMAINS))

    out: dict[str, Any] = {"domains": {}, "stages": {}}
    dm = _read_json(store, "data/download_manifest.json")
    if dm is None:
        out["stages"]["download"] = ("not run", "")
    else:
        srcs = dm.get("sources", {}) if isinstance(dm, dict) else {}
        counts: dict[str, int] = {}
        for e in srcs.values():
            counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
        out["stages"]["download"] = ("done", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if store.is_file("data/_SUCCESS"):
        man = _read_json(store, "data/manifest.json") or {}
        doms = man.get("domains", {}) if isinstance(man, dict) else {}
        out["stages"]["prepare"] = ("finished", f"{len(doms)} domain(s) in data/manifest.json" if doms else "")
    elif store.exists("data/manifest.json") or store.list_files("data/sft"):
        out["stages"]["prepare"] = ("incomplete", "data/ has files but no _SUCCESS: re-run prepare")
    else:
        out["stages"]["prepare"] = ("not started", "")
    if store.is_file("report/summary.json"):
        out["stages"]["report"] = ("written", store.uri_of("report/summary.html") if store.is_file("report/summary.html")
                                   else store.uri_of("report/summary.json"))
    else:
        out["stages"]["report"] = ("not written", "")

    for dom in domains:
        cand = states.get(dom, [])
        run, st = max(cand, key=lambda x: _ts_key(x[1].get("updated"))) if cand else (None, None)
        report = _read_json(store, f"adapters/{dom}/training_report.json") if dom in adapters else None
        row: dict[str, Any] = {"run": run}
        state = (st or {}).get("state")
        if st is not None and st.get("_unreadable"):
            row.update(state="unknown", detail=f"runs/{run}/domains/{dom}.json is not valid JSON")
        elif state == "finished" or (state is None and report is not None):
            vl = (st or {}).get("val_loss")
            if vl is None and report and not report.get("_unreadable"):
                vl = report.get("val_loss")
            uri = (st or {}).get("adapter_uri") or (report or {}).get("adapter_uri") or store.uri_of(f"adapters/{dom}")
            row.update(state="finished", detail=f"val loss {_fmt_loss(vl)}; adapter {uri}", val_loss=vl)
        elif state == "failed":
            err = str(st.get("error") or "no cause recorded").strip().splitlines()
            row.update(state="failed", detail=(err[-1] if err else "")[:300], error=st.get("error"))
        elif state == "running":
            row.update(state="running", detail=f"updated {_age(st.get('updated'))}".strip()
                       + (f"; an older adapter exists (val loss {_fmt_loss(report.get('val_loss'))})"
                          if report and not report.get("_unreadable") else ""))
        elif state == "skipped":
            row.update(state="skipped", detail=str(st.get("error") or ""))
        elif state is not None:
            row.update(state=str(state), detail="")
        else:
            row.update(state="not started", detail="")
        out["domains"][dom] = row
    return out


def _print_table(rows: list[tuple[str, str, str]], head: tuple[str, str, str]) -> None:
    w0 = max(len(r[0]) for r in rows + [head])
    w1 = max(len(r[1]) for r in rows + [head])
    for r in [head] + rows:
        print(f"{r[0].ljust(w0)}  {r[1].ljust(w1)}  {r[2]}".rstrip())


def run_status(config_path: Optional[str] = None, output: Optional[str] = None,
               sets: Optional[list[str]] = None, domains: Optional[list[str]] = None) -> int:
    """Print the stage and domain states; ``domains`` (from --domains) narrows the list."""
    wanted = domains
    from pipeline.storage import Store
    run_name: Optional[str] = None
    domains: Optional[list[str]] = None
    storage_cfg = None
    if config_path:
        from pipeline.config import load_config
        cfg = load_config(config_path, sets=sets, output=output)
        uri, run_name, domains, storage_cfg = cfg.output, cfg.run_name, list(cfg.domains), cfg.storage
    elif output:
        uri = output
    else:
        from pipeline.errors import UserFacingError
        raise UserFacingError("status needs --output URI (or --config FILE)")
    try:
        store = Store(uri, storage_cfg)
        if not store.exists(""):
            print(f"nothing at {store.uri}: no stage has written there yet (check --output)")
            return 1
        if wanted:
            domains = list(wanted)
        st = collect_status(store, run_name, domains)
    except Exception as e:
        print(f"cannot read {uri}: {type(e).__name__}: {e}")
        return 1
    print(f"output: {store.uri}" + (f"   run: {run_name}" if run_name else ""))
    _print_table([(k, v[0], v[1]) for k, v in st["stages"].items()], ("stage", "state", "detail"))
    print()
    _print_table([(d, r["state"], r["detail"]) for d, r in st["domains"].items()], ("domain", "state", "detail"))
    return 0
