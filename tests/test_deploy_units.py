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


def exec_argv(unit: Path, instance: str = "0", uncomment: str = "") -> list[str]:
    """ExecStart with Environment=, the shipped env files and %i substituted, as systemd would:
    ``${VAR}`` is one word, a bare ``$VAR`` word splits at whitespace (empty: no word). ``uncomment``
    names a commented ``#VAR=`` example in the env files to use instead of its shipped value."""
    text = unit.read_text().replace("%i", instance)  # systemd expands specifiers in every line
    env = dict(re.findall(r"^Environment=(\w+)=(.*)$", text, re.M))
    for name in re.findall(r"^EnvironmentFile=-?/etc/pqmesh/([\w.-]+)$", text, re.M):
        shipped = DEPLOY / "env" / name
        if shipped.is_file():
            body = shipped.read_text()
            if uncomment:
                body = re.sub(rf"^{uncomment}=.*$", "", body, flags=re.M).replace(f"#{uncomment}=", f"{uncomment}=")
            env.update(re.findall(r"^(\w+)=(.*)$", body, re.M))
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    argv = []
    for word in shlex.split(line):
        bare = re.fullmatch(r"\$(\w+)", word)
        argv += env[bare.group(1)].split() if bare else [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word)]
    return argv


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


def test_security_examples_in_the_env_files_parse_with_the_clis(capsys, tmp_path):
    """The commented TLS/token examples, uncommented, are flags the CLIs accept (their files missing
    here, so the CLIs stop at the first one and name it)."""
    from planner.main import parse_args
    from stage_server.config import StageConfig

    stage = exec_argv(DEPLOY / "systemd" / "pqmesh-stage@.service", "0", uncomment="PQMESH_STAGE_SECURITY_ARGS")
    assert stage[stage.index("--allowed-client-cn") + 1] == "coordinator"
    assert exec_argv(DEPLOY / "systemd" / "pqmesh-stage@.service")[-1] == "info"  # shipped empty: no word
    planner = exec_argv(DEPLOY / "systemd" / "pqmesh-planner.service", uncomment="PQMESH_PLANNER_SECURITY_ARGS")
    for parse, argv, cert in (
        (StageConfig.from_args, stage[1:], "stage.pem"),
        (parse_args, planner[1:], "planner.pem"),
    ):
        with pytest.raises(SystemExit):
            parse(argv)
        assert f"--tls-cert /etc/pqmesh/tls/{cert}: no such file" in capsys.readouterr().err
    from coordinator.config import CoordinatorConfig

    coordinator = exec_argv(
        DEPLOY / "systemd" / "pqmesh-coordinator.service", uncomment="PQMESH_COORDINATOR_SECURITY_ARGS"
    )
    assert coordinator[coordinator.index("--stage-tls-cert") + 1] == "/etc/pqmesh/tls/coordinator.pem"
    with pytest.raises(SystemExit):
        CoordinatorConfig.from_args(_with_plan(coordinator, _plan_file(tmp_path, ["a:1", "b:1", "c:1"]))[1:])
    assert "--tls-cert /etc/pqmesh/tls/coordinator.pem: no such file" in capsys.readouterr().err


def _plan_file(directory: Path, addresses: list[str]) -> Path:
    """A three-stage plan as `pqmesh plan --json` writes it (addresses added when given)."""
    import json

    cuts = [(0, 16), (16, 32), (32, 48)]
    stages = [{"device": f"gpu{i}", "layers": [a, b], "bits": [4] * (b - a)} for i, (a, b) in enumerate(cuts)]
    for stage, address in zip(stages, addresses):
        stage["address"] = address
    path = directory / "plan.json"
    path.write_text(json.dumps({"plan": {"stages": stages, "prefill_micro_batch": 2, "decode_micro_batch": 8},
                                "predicted": {}}))
    return path


def _with_plan(argv: list[str], plan: Path) -> list[str]:
    """The shipped ExecStart, reading ``plan`` instead of /etc/pqmesh/plan.json (absent here)."""
    assert argv[argv.index("--plan") + 1] == "/etc/pqmesh/plan.json"
    return [str(plan) if word == "/etc/pqmesh/plan.json" else word for word in argv]


def test_coordinator_exec_start_parses_with_the_cli(tmp_path):
    from coordinator.config import CoordinatorConfig

    unit = DEPLOY / "systemd" / "pqmesh-coordinator.service"
    argv = exec_argv(unit)
    assert argv[0].endswith("/pqmesh-coordinator")
    config = CoordinatorConfig.from_args(_with_plan(argv, _plan_file(tmp_path, ["a:50060", "b:50060", "c:50060"]))[1:])
    assert (config.listen, str(config.state_dir), config.model_id) == ("0.0.0.0:50051", "/var/lib/pqmesh/coordinator",
                                                                       "opt-30b")
    assert (config.max_sequences, config.max_tokens_per_sequence, config.metrics_listen) == (32, 1024, "0.0.0.0:9151")
    # the commented example of extra flags: a local model copy and the stage addresses in pipeline order
    argv = exec_argv(unit, uncomment="PQMESH_COORDINATOR_ARGS")
    config = CoordinatorConfig.from_args(_with_plan(argv, _plan_file(tmp_path, []))[1:])
    assert config.plan.addresses == ("gpu-a:50060", "gpu-b:50060", "gpu-c:50060")
    assert str(config.model_root) == "/var/lib/pqmesh/models"


def test_every_unit_exports_metrics_on_its_own_port():
    from planner.main import parse_args
    from stage_server.config import StageConfig

    planner = parse_args(exec_argv(DEPLOY / "systemd" / "pqmesh-planner.service")[1:])
    stages = [
        StageConfig.from_args(exec_argv(DEPLOY / "systemd" / "pqmesh-stage@.service", str(i))[1:]) for i in (0, 3)
    ]
    assert planner.metrics_listen == "0.0.0.0:9150"
    assert [s.metrics_listen for s in stages] == ["0.0.0.0:9160", "0.0.0.0:9163"]
    assert "--metrics-listen=${PQMESH_COORDINATOR_METRICS_LISTEN}" in (
        DEPLOY / "systemd" / "pqmesh-coordinator.service").read_text()
