"""A regular (non-editable) wheel install finds the packaged configs and trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_install_trains(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(REPO), "-w", str(wheels)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("popgrad-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        timeout=600,
    )
    assert (target / "popgrad_cli" / "conf" / "config.yaml").is_file()
    assert (target / "popgrad_cli" / "conf" / "hydra" / "launcher" / "joblib.yaml").is_file()

    # Run outside the repository, with the installed copy first on the path, so
    # neither the source tree nor the editable install can supply the configs.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    environment = dict(os.environ, PYTHONPATH=str(target), POPGRAD_DATA=str(tmp_path / "data"))
    script = (
        "import sys, popgrad_cli.cli as cli; "
        "print('module', cli.__file__); print('configs', cli.conf_dir()); "
        "sys.exit(cli.main(['train', 'trainer.epochs=1', 'method=pg', 'method.population_size=2']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=environment, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"module {target}" in output
    assert f"configs {target}" in output
    (run_dir,) = (workdir / "outputs" / "runs").glob("*/*")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
