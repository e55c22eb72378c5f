"""The one typed config: YAML, then --set, then the seed's environment variables; unknown keys and
bad values fail at start with a message naming the key and the fix."""
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/demo.yaml"
DEFAULT = ROOT / "configs/default.yaml"


def test_shipped_configs_load_and_start_with_their_command():
    demo = load_config(DEMO, environ={})
    assert demo.model.base == "tiny" and demo.resources.device == "cpu"
    assert Path(demo.data.raw_dir) == ROOT / "fixtures/raw"      # relative to the YAML file
    assert Path(demo.output) == ROOT / "output/demo"
    default = load_config(DEFAULT, environ={})
    assert default.resources.device == "cuda" and "/" in default.model.base  # a Hugging Face id, untouched
    assert default.model.trust_remote_code is False and default.model.quantization == "nf4"
    for f in (DEMO, DEFAULT):
        first = f.read_text().splitlines()[0]
        assert first.startswith("# Run:") and "adapters run --config configs/" in first


def test_unknown_key_names_key_and_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key; remove it or fix its spelling"):
        load_config(DEMO, sets=["train.max_stepz=3"], environ={})
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {base: tiny}\nresources: {device: cpu}\nlora: {rank: 8}\n")
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown key"):
        load_config(bad, environ={})


@pytest.mark.parametrize("override,needle", [
    ("lora.r=0", r"lora\.r: .*greater than or equal to 1"),
    ("resources.device=tpu", r"resources\.device: .*'cpu' or 'cuda'"),
    ("data.split={train: 0.5, val: 0.1, test: 0.1}", r"data\.split: .*sum to 1"),
    ("domains=[debate, debate]", r"domains: .*twice"),
    ("domains=['../etc']", r"not a valid name"),
    ("run_name=../x", r"run_name"),
    ("data.sources=[debatesum, nosuch]", r"unknown source"),
    ("train.per_domain={physics: {max_steps: 3}}", r"physics.*not in domains"),
])
def test_bad_values_fail_at_start_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(DEMO, sets=[override], environ={})


def test_missing_required_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("resources: {device: cpu}\n")
    with pytest.raises(ConfigError, match=r"model: required; add it"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_precedence_yaml_then_set_then_env_then_cli_paths(tmp_path):
    cfg = load_config(DEMO, sets=["data.max_docs_per_source=7", "train.max_steps=3"],
                      environ={"MAX_DOCS_PER_SOURCE": "11"})
    assert cfg.data.max_docs_per_source == 11            # the seed's variable wins over --set
    assert cfg.train.max_steps == 3
    cfg = load_config(DEMO, raw_dir=str(tmp_path), output="s3://bkt/p", environ={})
    assert cfg.data.raw_dir == str(tmp_path) and cfg.output == "s3://bkt/p"


def test_seed_environment_variables():
    env = {"MAX_DOCS_PER_SOURCE": "5", "MAX_SFT_PER_DOMAIN": "9", "ALLOW_MISSING_DATA": "1",
           "HF_HUB_OFFLINE": "1", "DOWNLOAD_ONLY": "IAM, medquad", "DOWNLOAD_SKIP": "ddo",
           "DOWNLOAD_OPENCASLIST": "1", "DDO_DEBATES_URL": "https://example.org/d.json"}
    cfg = load_config(DEFAULT, environ=env)
    d = cfg.data
    assert (d.max_docs_per_source, d.max_sft_per_domain, d.allow_missing) == (5, 9, True)
    assert d.download.offline and d.download.opencaselist
    assert d.download.only == ["iam", "medquad"] and d.download.skip == ["ddo"]
    assert d.download.ddo_debates_url == "https://example.org/d.json"
    assert load_config(DEFAULT, environ={"DOWNLOAD_OPENCASELIST": "1"}).data.download.opencaselist  # right spelling too
    with pytest.raises(ConfigError, match="MAX_SFT_PER_DOMAIN='many' is not an integer"):
        load_config(DEFAULT, environ={"MAX_SFT_PER_DOMAIN": "many"})
    with pytest.raises(ConfigError, match="unknown source"):
        load_config(DEFAULT, environ={"DOWNLOAD_ONLY": "wikipedia"})


def test_every_source_setting_is_a_key_set_by_its_variables_and_redacted_when_a_url():
    """Config names no source: data.download's per-source keys, their environment variables and which are
    redacted come from the SourceSpecs (a source adding a setting gets all three)."""
    from pipeline.sources import SETTINGS
    from jobs.submit import runtime_env
    assert {s.key for s in SETTINGS} >= {"opencaselist", "ddo_debates_url", "ddo_users_url", "ddo_gdrive_folder_url"}
    for s in SETTINGS:
        for var in s.env:
            value = "1" if s.kind == "opt_in" else f"https://user:pw@example.org/{s.key}?token=tok{s.key}"
            cfg = load_config(DEFAULT, environ={var: value})
            got = getattr(cfg.data.download, s.key)
            assert got == (True if s.kind == "opt_in" else value), (s.key, var)
            dumped = str(cfg.redacted())
            assert (f"tok{s.key}" not in dumped and "pw@" not in dumped) if s.kind == "url" else True, s.key
            assert runtime_env(ROOT, environ={var: value})["env_vars"][var] == value   # carried to a submitted job
        assert getattr(load_config(DEFAULT, environ={}).data.download, s.key) in (False, None)


def test_a_source_part_must_read_declared_url_settings():
    from pipeline.sources import DownloadPart, SourceSetting, SourceSpec
    part = DownloadPart("X", "http", files=(("a.json", "x_a_url"),))
    with pytest.raises(ValueError, match="data.download.x_a_url"):
        SourceSpec("x", "debate", "X", ("a.json",), None, None, None, parts=(part,))
    ok = SourceSpec("x", "debate", "X", ("a.json",), None, None, None, parts=(part,),
                    settings=(SourceSetting("x_a_url", "url", ("X_A_URL",)),))
    assert ok.setting("x_a_url").env == ("X_A_URL",) and ok.opt_in is None


def test_per_domain_overrides_and_redaction():
    cfg = load_config(DEMO, sets=["train.per_domain={medicine: {max_steps: 7, lora: {r: 4, alpha: 8}}}",
                                  "data.download.ddo_debates_url=https://u:secret@h/x?token=abc"], environ={})
    assert cfg.hyper_for("medicine").max_steps == 7 and cfg.hyper_for("medicine").lora.r == 4
    assert cfg.hyper_for("debate").max_steps == cfg.train.max_steps
    red = str(cfg.redacted())
    assert "secret" not in red and "abc" not in red


def test_on_off_stay_words_and_booleans_still_parse(tmp_path):
    """YAML 1.1 reads a bare on/off/yes/no as a boolean; the config reads them as words, so the
    on/off/auto settings take them, and boolean settings still accept them (and true/false)."""
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: tiny}\nresources: {device: cpu}\n"
                 "train: {fused_lora: off, fused_kernels: on, packing: no}\ndata: {allow_missing: yes}\n")
    cfg = load_config(f, environ={})
    assert (cfg.train.fused_lora, cfg.train.fused_kernels) == ("off", "on")
    assert cfg.train.packing is False and cfg.data.allow_missing is True
    cfg = load_config(DEMO, sets=["train.fused_lora=off", "train.fused_kernels=on", "data.download.offline=on",
                                  "train.mask_prompt=false", "train.max_steps=3"], environ={})
    assert (cfg.train.fused_lora, cfg.train.fused_kernels) == ("off", "on")
    assert cfg.data.download.offline is True and cfg.train.mask_prompt is False and cfg.train.max_steps == 3


def test_tracking_is_off_by_default_and_its_uri_is_redacted():
    from pipeline.config import ConfigError, load_config
    assert load_config(DEFAULT).tracking.mlflow is None and load_config(DEFAULT).tracking.wandb is None
    c = load_config(DEFAULT, sets=['tracking.mlflow={tracking_uri: "https://me:s3cret@mlflow.example/x"}',
                                   "tracking.wandb={project: p, mode: offline}"])
    assert c.tracking.mlflow.experiment == "domain-adapters" and c.tracking.wandb.mode == "offline"
    assert "s3cret" not in str(c.redacted())
    with pytest.raises(ConfigError, match="tracking.mlflow.tracking_uri: required"):
        load_config(DEFAULT, sets=["tracking.mlflow={experiment: x}"])
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        load_config(DEFAULT, sets=["tracking.wandb={project: p, mode: sometimes}"])
