import json

import pytest

from dtrak.config import (
    PRESETS,
    ConfigError,
    apply_overrides,
    diff_configs,
    load_config,
    preset,
    save_config,
)


def test_presets_validate():
    for name in PRESETS:
        assert preset(name).name == name


def test_overrides_and_diff():
    base = preset("tiny")
    cfg = apply_overrides(base, ["train.steps=7", 'attribution.outputs=["loss","avg"]'])
    assert cfg.train.steps == 7
    assert cfg.attribution.outputs == ("loss", "avg")
    assert diff_configs(base, cfg) == ["attribution.outputs", "train.steps"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.bogus=1", "unknown key(s) bogus"),
        ("nosection.x=1", "unknown config section"),
        ("train.steps=abc", "train.steps: expected int"),
        ("lds.alpha=1.5", "lds.alpha: must be in (0, 1)"),
        ("train.steps", "section.key=value"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(preset("tiny"), [override])
    assert needle in str(err.value)


def test_toml_with_preset_and_json_roundtrip(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[train]\nsteps = 3\n')
    cfg = load_config(toml)
    assert cfg.train.steps == 3 and cfg.model.preset == "tiny"
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["train"]["steps"] == 3


def test_missing_config_file():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("/nonexistent/x.toml")
