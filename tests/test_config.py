"""Every config option composes, and invalid values are rejected with the key named."""

from pathlib import Path

import pytest

from popgrad_cli.cli import conf_dir
from popgrad_cli.config import ConfigError, unused_method_keys, validate_config

GROUPS = ("dataset", "model", "method", "optimizer", "schedule", "trainer")


def options(group):
    return sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(compose_config, group):
    assert options(group), f"no options in conf/{group}"
    for option in options(group):
        cfg = compose_config(f"{group}={option}")
        validate_config(cfg)


def test_default_config_is_digits_mlp_baseline(compose_config):
    cfg = compose_config()
    assert cfg.dataset.name == "digits"
    assert cfg.model.name == "mlp"
    assert cfg.method.name == "baseline"
    assert cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.weight_decay == 1e-5


def test_every_yaml_key_is_commented():
    for path in Path(conf_dir()).rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- "):
                continue
            if stripped.endswith(":"):
                continue  # a section header; its keys carry the comments
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_data_root_defaults_to_environment(compose_config, monkeypatch):
    monkeypatch.setenv("POPGRAD_DATA", "/tmp/popgrad-data-test")
    assert compose_config().data.root == "/tmp/popgrad-data-test"


def test_unknown_key_fails_composition(compose_config):
    with pytest.raises(Exception, match="lerning_rate"):
        compose_config("optimizer.lerning_rate=0.1")


@pytest.mark.parametrize(
    "override,key",
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("dataset.val_fraction=1.0", "dataset.val_fraction"),
        ("method=pg method.population_size=0", "method.population_size"),
        ("method=pg method.sigma=-0.1", "method.sigma"),
        ("method=pg method.antithetic=true method.population_size=3", "method.population_size"),
        ("method=pg method.batch=split method.population_size=8 trainer.batch_size=4", "trainer.batch_size"),
        ("model.activation=gelu", "model.activation"),
        ("device=tpu", "device"),
    ],
)
def test_invalid_values_name_the_key(compose_config, override, key):
    cfg = compose_config(*override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_population_keys_on_baseline_are_reported(compose_config):
    cfg = compose_config("method.population_size=4", "method.sigma=0.1")
    assert unused_method_keys(cfg.method) == ["method.population_size=4", "method.sigma=0.1"]
    assert unused_method_keys(compose_config("method=pg", "method.population_size=4").method) == []
