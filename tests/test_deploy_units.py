"""The systemd units verify with `systemd-analyze` and their ExecStart lines parse with the real CLIs."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VENV_BIN = Path(sys.executable).parent


def ensure_systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=False, capture_output=True, timeout=600)
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing and could not be installed (apt-get install systemd)")
    return found


def installed_copy(unit: Path, directory: Path) -> Path:
    """The unit as installed, but pointing at this checkout's virtualenv."""
    text = unit.read_text().replace("/opt/pqmesh/.venv/bin", str(VENV_BIN))
    target = directory / unit.name
    target.write_text(text)
    return directory / unit.name.replace("@.", "@0.")


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies_cleanly(unit, tmp_path):
    analyze = ensure_systemd_analyze()
    path = installed_copy(unit, tmp_path)
    result = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def exec_argv(unit: Path, instance: str = "0") -> list[str]:
    """ExecStart with Environment=, the shipped env files and %i substituted, as systemd would."""
    text = unit.read_text().replace("%i", instance)  # systemd expands specifiers in every line
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", text, re.M))
    for name in re.findall(r"^EnvironmentFile=-?/etc/pqmesh/([\w.-]+)$", text, re.M):
        shipped = DEPLOY / "env" / name
        if shipped.is_file():
            env.update(re.findall(r"^(\w+)=(.*)$", shipped.read_text(), re.M))
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word) for word in shlex.split(line)]


def test_stage_exec_start_parses_with_the_cli():
    from stage_server.config import StageConfig

    argv = exec_argv(DEPLOY / "systemd" / "pqmesh-stage@.service", "1")
    assert argv[0].endswith("/pqmesh-stage")
    config = StageConfig.from_args(argv[1:])
    assert (config.listen, config.device, config.memory_budget) == ("0.0.0.0:50061", "cuda:1", 0)
    assert str(config.model_root) == "/var/lib/pqmesh/models"


def test_every_env_file_is_used_by_a_unit():
    referenced = " ".join(u.read_text() for u in UNITS)
    for env in (DEPLOY / "env").glob("*.env"):
        assert f"/etc/pqmesh/{env.name}" in referenced


def test_planner_exec_start_parses_with_the_cli():
    from planner.main import parse_args

    argv = exec_argv(DEPLOY / "systemd" / "pqmesh-planner.service")
    assert argv[0].endswith("/pqmesh-planner")
    config = parse_args(argv[1:])
    assert str(config.state_dir) == "/var/lib/pqmesh/planner"
