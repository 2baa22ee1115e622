"""Shared fixtures: composing the real configs and running the real console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from popgrad_cli.cli import conf_dir, register_resolvers
from popgrad_cli.config import register_configs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def compose_config():
    """Return a function that composes conf/config.yaml with overrides, as `popgrad train` would."""
    register_configs()
    register_resolvers()

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)

    return _compose


@pytest.fixture
def popgrad(tmp_path):
    """Return a function that runs the installed `popgrad` console script in tmp_path."""

    def _run(*arguments, cwd=None, env=None, timeout=600):
        environment = dict(os.environ)
        environment.setdefault("POPGRAD_DATA", str(tmp_path / "data"))
        environment.update(env or {})
        executable = Path(sys.executable).parent / "popgrad"
        return subprocess.run(
            [str(executable), *arguments],
            cwd=cwd or tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return _run
