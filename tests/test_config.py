"""Typed configuration: presets, YAML merging, strict keys and types, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from advgrpo.common.errors import ConfigError
from advgrpo.common.typed_config import apply_override, deep_merge, from_mapping
from advgrpo.reward_server.config import PRESETS, load_config


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 1
    path: Path | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_from_mapping_builds_nested_dataclasses_and_coerces():
    cfg = from_mapping(Outer, {"steps": 3, "path": "/tmp/a", "inner": {"lr": 1, "betas": [0.9, 0.99]}, "tags": ["a"]})
    assert cfg == Outer(steps=3, path=Path("/tmp/a"), inner=Inner(lr=1.0, betas=(0.9, 0.99)), tags=["a"])
    assert isinstance(cfg.inner.lr, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stpes": 1}, "stpes: unknown key"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"steps": True}, "steps: expected an integer"),
        ({"inner": {"lr": "fast"}}, "inner.lr: expected a number"),
        ({"inner": {"betas": [0.1]}}, "inner.betas: expected 2 values"),
        ({"inner": 3}, "inner: expected a mapping"),
        ({"tags": "a"}, "tags: expected a list"),
    ],
)
def test_from_mapping_names_the_bad_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, data)


def test_overrides_and_merge():
    data = apply_override({"a": {"b": 1}}, "a.c=[1, 2]")
    data = apply_override(data, "x.y.z=hello")
    assert data == {"a": {"b": 1, "c": [1, 2]}, "x": {"y": {"z": "hello"}}}
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "novalue")
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_presets_load_and_yaml_merges_over_them(tmp_path):
    for name in PRESETS:
        assert load_config(name).models
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 0}\nmodels:\n  ocr: null\n  dino: {params: {num_patches: 4}}\n")
    cfg = load_config("tiny", f)
    assert [m.name for m in cfg.models] == ["dino", "pickscore", "dino_similarity"]
    assert cfg.model("dino").params.num_patches == 4 and cfg.model("dino").params.backbone == "toy"
    assert cfg.server.port == 0 and cfg.default_weights() == {"dino": 1.0}
    # The evaluation metric is served, but not part of the default spec (it needs references).
    for preset, backbone, size in (("tiny", "toy", 32), ("toy", "toy", 32), ("sd3-adv", "facebook/dinov2-base", 518)):
        sim = load_config(preset).model("dino_similarity")
        assert (sim.kind, sim.weight, sim.params.backbone, sim.params.image_size) == (
            "dino_similarity",
            0,
            backbone,
            size,
        )
        assert sim.params.image_mean == (0.485, 0.456, 0.406) and sim.params.image_std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("models: {x: {kind: nope}}", "models.x.kind: expected one of"),
        ("models: {x: {kind: noop, wieght: 1}}", "models.x.wieght: unknown key"),
        ("models: {x: {kind: noop, batching: {max_batch_size: 0}}}", "max_batch_size: must be >= 1"),
        (
            "models: {x: {kind: dino_similarity, params: {reference_cache_bytes: -1}}}",
            "reference_cache_bytes: must be >= 0",
        ),
        ("models: {x: {kind: dino_similarity, params: {num_patches: 4}}}", "models.x.params.num_patches: unknown key"),
        ("models: {}", "no models configured"),
        ("servr: {}", "servr: unknown key"),
        ("[1, 2]", "expected a mapping"),
        ("a: [", "invalid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(None, f)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("server: {http_port: 70000}", "server.http_port: must be in 0..65535, got 70000"),
        ("server: {max_message_bytes: 3221225472}", r"server.max_message_bytes: must be in 1024..2147483647"),
        ("server: {log_level: verbose}", "server.log_level: expected one of DEBUG, INFO"),
        ("server: {host: ''}", "server.host: must not be empty"),
        ("server: {min_version_wait_s: -1}", r"server.min_version_wait_s: must be >= 0 and finite, got -1"),
        ("server: {min_version_wait_s: .nan}", r"server.min_version_wait_s: must be >= 0 and finite, got nan"),
        ("models: {dino/v2: {kind: noop}}", r"models.dino/v2: a model name may use only letters"),
        ("models: {'..': {kind: noop}}", None),  # dots alone are a legal file name part: accepted
    ],
)
def test_server_settings_are_checked_before_anything_starts(tmp_path, yaml_text, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text + ("" if "models" in yaml_text else "\nmodels: {n: {kind: noop}}"))
    if message is None:
        load_config(None, f)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, f)


def test_ipv6_hosts_are_kept_bare_and_bracketed_in_addresses():
    from advgrpo.reward_server.config import address

    for given in ("::1", "[::1]"):
        cfg = load_config("noop", overrides={"server": {"host": given}})
        assert cfg.server.host == "::1"
        assert address(cfg.server.host, 50051) == "[::1]:50051"
    assert address("127.0.0.1", 50051) == "127.0.0.1:50051"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--http-port", "70000"], "server.http_port"),
        (["--max-message-bytes", "3221225472"], "server.max_message_bytes"),
        (["--log-level", "verbose"], "server.log_level"),
    ],
)
def test_bad_flags_exit_2_with_the_setting_named(flags, message):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", "--preset", "noop", *flags],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "config error" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_loading_with_overrides_never_changes_a_preset():
    from advgrpo.trainer.config import load_train_config

    off = ["adversarial.references=refs.json"]  # a path: read when training starts, not here
    before = load_train_config("tiny", sets=off).reward.timeout_s
    assert load_train_config("tiny", sets=[*off, "reward.timeout_s=7"]).reward.timeout_s == 7
    assert load_train_config("tiny", sets=off).reward.timeout_s == before != 7
    port = load_config("tiny").server.port
    assert load_config("tiny", overrides={"server": {"port": port + 1}}).server.port == port + 1
    assert load_config("tiny").server.port == port


def test_a_reward_spec_in_a_file_or_override_replaces_the_presets(tmp_path):
    """reward.weights is one value: a config file's or a caller's spec is the spec, not the
    preset's plus it (an experiment on the proxy alone once also trained on the preset's dino)."""
    from advgrpo.trainer.config import load_train_config

    assert load_train_config("tiny").reward.weights == {"dino": 1.0}
    path = tmp_path / "train.yaml"
    path.write_text("reward:\n  weights: {ocr: 1.0}\nrun:\n  eval_weights: {ocr: 1.0}\n")
    assert load_train_config("dino_cotrain_sd3_patch_fast").run.eval_weights == {"pickscore": 1.0}
    cfg = load_train_config("dino_cotrain_sd3_patch_fast", config_file=path)
    assert cfg.reward.weights == {"ocr": 1.0} and cfg.run.eval_weights == {"ocr": 1.0}
    assert load_train_config("tiny", overrides={"reward": {"weights": {"saturation": 1.0}}}).reward.weights == {
        "saturation": 1.0
    }
    # --set names one model's weight: it is added to the spec.
    assert load_train_config("tiny", sets=["reward.weights.ocr=0.5"]).reward.weights == {"dino": 1.0, "ocr": 0.5}
    # Other mappings still merge key by key.
    assert deep_merge({"a": {"b": 1, "w": {"x": 1}}}, {"a": {"w": {"y": 2}}}, whole=("w",)) == {
        "a": {"b": 1, "w": {"y": 2}}
    }
