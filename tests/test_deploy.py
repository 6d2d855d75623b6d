"""deploy/: the installer, the systemd units, the Redis settings and the monitoring files.

Everything runs against temporary directories; nothing here touches the host's systemd,
/opt, /etc or a Redis the test did not start.

How the units are checked with systemd-analyze (systemd 252 here):
- ``security --offline=true deploy/notifier.service`` works on the repository file as is.
- ``verify`` insists that ExecStart's binary exists, so it cannot check the repository file
  on a host without /opt/notifier. Instead install.sh installs into a temporary root (its
  ``--no-pip`` stub provides ``$root/opt/notifier/venv/bin/notifier``) and the test runs
  ``systemd-analyze verify --root=$root notifier.service notifier@test.service``. With
  ``--root`` systemd-analyze resolves both the units and ExecStart inside that root, and it
  then also needs the targets a service depends on by default (sysinit.target,
  basic.target, shutdown.target) plus the ones the units name, copied from the host.
  ``verify`` exits 0 even on unknown keys, so the test asserts that it prints nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
INSTALL = DEPLOY / "install.sh"
UNITS = ("notifier.service", "notifier@.service")

METRICS = {
    # histograms (seconds)
    "notifier_delivery_latency_seconds",
    "notifier_queue_wait_seconds",
    "notifier_smtp_seconds",
    # counters
    "notifier_delivered_total",
    "notifier_delivered_within_target_total",
    "notifier_retried_total",
    "notifier_dead_total",
    # gauges
    "notifier_queue_depth",
    "notifier_retry_depth",
    "notifier_dead_depth",
    "notifier_processing_depth",
    "notifier_inflight_sends",
    "notifier_smtp_connections",
    "notifier_smtp_paused",
    "notifier_latency_target_seconds",
    "notifier_strategy_last_seen_timestamp_seconds",
    "notifier_strategy_silent",
}
HISTOGRAMS = {
    "notifier_delivery_latency_seconds",
    "notifier_queue_wait_seconds",
    "notifier_smtp_seconds",
}

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian: package systemd)",
)
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: package prometheus; `make test` installs it)",
)


# --- install.sh --------------------------------------------------------------------------


def install(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def install_root(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return install("--root", str(root), "--no-pip", *args)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and, for files, its content."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (
            p.lstat().st_mode,
            p.read_bytes() if p.is_file() and not p.is_symlink() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def test_install_creates_the_layout(tmp_path):
    root = tmp_path / "root"
    result = install_root(root)

    venv_bin = root / "opt/notifier/venv/bin"
    stub = venv_bin / "notifier"
    assert stub.is_file() and os.access(stub, os.X_OK)
    etc = root / "etc/notifier"
    assert mode(etc) == 0o750
    env = etc / "notifier.env"
    assert mode(env) == 0o640
    if (REPO / ".env.example").exists():
        assert env.read_bytes() == (REPO / ".env.example").read_bytes()
    secret = etc / "smtp_password"
    assert secret.read_bytes() == b""
    assert mode(secret) == 0o600
    for unit in UNITS:
        installed = root / "etc/systemd/system" / unit
        assert installed.read_bytes() == (DEPLOY / unit).read_bytes()
        assert mode(installed) == 0o644
    # The next steps are printed.
    out = result.stdout
    assert "notifier.env" in out and "smtp_password" in out
    assert "systemctl enable --now notifier" in out
    assert "notifier check" in out
    assert "authorization code" in out


def test_second_run_is_idempotent_and_keeps_config_and_secret(tmp_path):
    root = tmp_path / "root"
    install_root(root)
    env = root / "etc/notifier/notifier.env"
    secret = root / "etc/notifier/smtp_password"
    env.write_text("NOTIFIER_SMTP_PROVIDER=qq\nNOTIFIER_SMTP_USERNAME=me@qq.com\n")
    secret.write_text("abcdefghijklmnop\n")
    before = snapshot(root)

    result = install_root(root)

    assert snapshot(root) == before
    assert env.read_text() == "NOTIFIER_SMTP_PROVIDER=qq\nNOTIFIER_SMTP_USERNAME=me@qq.com\n"
    assert secret.read_text() == "abcdefghijklmnop\n"
    assert mode(secret) == 0o600
    assert f"kept: {env}" in result.stdout
    assert f"kept: {secret}" in result.stdout
    assert "+ " not in result.stdout  # no action taken at all


def test_rerun_restores_changed_units(tmp_path):
    # Units belong to the package: an upgrade replaces them (overrides go in drop-ins).
    root = tmp_path / "root"
    install_root(root)
    unit = root / "etc/systemd/system/notifier.service"
    unit.write_text("[Service]\nExecStart=/bin/false\n")
    install_root(root)
    assert unit.read_bytes() == (DEPLOY / "notifier.service").read_bytes()


def test_warns_about_a_readable_secret(tmp_path):
    root = tmp_path / "root"
    install_root(root)
    secret = root / "etc/notifier/smtp_password"
    secret.chmod(0o644)
    result = install_root(root)
    assert "chmod 600" in result.stderr
    assert mode(secret) == 0o644  # reported, not changed behind the operator's back


def test_dry_run_creates_nothing(tmp_path):
    root = tmp_path / "root"
    result = install_root(root, "--dry-run")
    assert not root.exists()
    lines = result.stdout.splitlines()
    actions = [line for line in lines if line.startswith("[dry-run] ")]
    assert any("notifier/venv/bin/notifier" in line for line in actions)
    assert any("smtp_password" in line for line in actions)
    assert any("notifier.env" in line for line in actions)
    for unit in UNITS:
        assert any(line.endswith(f"etc/systemd/system/{unit}") for line in actions), unit
    assert not [line for line in lines if line.startswith("+ ")]
    assert "dry run: nothing was changed" in result.stdout


def test_dry_run_with_pip_creates_nothing(tmp_path):
    root = tmp_path / "root"
    result = install("--root", str(root), "--dry-run")
    assert not root.exists()
    assert "[dry-run] python3 -m venv " in result.stdout
    assert "-m pip install" in result.stdout


def test_dry_run_over_an_install_changes_nothing(tmp_path):
    root = tmp_path / "root"
    install_root(root)
    (root / "etc/systemd/system/notifier.service").write_text("old unit\n")
    before = snapshot(root)
    result = install_root(root, "--dry-run")
    assert snapshot(root) == before
    assert "[dry-run] install -m 0644" in result.stdout  # it would replace the old unit

    install_root(root, "--uninstall", "--purge", "--dry-run")
    assert snapshot(root) == before


def test_uninstall_removes_units_and_venv_and_keeps_config(tmp_path):
    root = tmp_path / "root"
    install_root(root)
    secret = root / "etc/notifier/smtp_password"
    secret.write_text("abcdefghijklmnop\n")
    # What `systemctl enable notifier notifier@1` would have left behind.
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "notifier.service").symlink_to("../notifier.service")
    (wants / "notifier@1.service").symlink_to("../notifier@.service")

    install_root(root, "--uninstall")

    assert not (root / "opt/notifier").exists()
    for unit in UNITS:
        assert not (root / "etc/systemd/system" / unit).exists()
    assert list(wants.iterdir()) == []
    assert secret.read_text() == "abcdefghijklmnop\n"
    assert (root / "etc/notifier/notifier.env").exists()

    # Again: nothing left to remove, still fine.
    install_root(root, "--uninstall")
    # --purge removes the configuration as well.
    install_root(root, "--uninstall", "--purge")
    assert not (root / "etc/notifier").exists()


def test_purge_removes_only_our_files(tmp_path):
    # --etc may point at a directory shared with other software.
    root = tmp_path / "root"
    install_root(root)
    etc = root / "etc/notifier"
    (etc / "notifier-2.env").write_text("NOTIFIER_METRICS_PORT=9465\n")
    (etc / "unrelated.conf").write_text("keep me\n")
    install_root(root, "--uninstall", "--purge")
    assert sorted(p.name for p in etc.iterdir()) == ["unrelated.conf"]


def test_explicit_directories_without_root(tmp_path):
    prefix, etc, units = tmp_path / "srv/notifier", tmp_path / "cfg", tmp_path / "units"
    args = ["--prefix", str(prefix), "--etc", str(etc), "--unit-dir", str(units)]
    install(*args, "--no-pip", "--no-systemctl")
    assert (prefix / "venv/bin/notifier").exists()
    assert mode(etc / "smtp_password") == 0o600
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS)
    install(*args, "--uninstall", "--no-systemctl")
    assert not prefix.exists()
    assert not list(units.iterdir())
    assert (etc / "smtp_password").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option"),
        (["--purge"], "--purge only goes with --uninstall"),
        (["--prefix", "relative/dir"], "must be absolute"),
        (["--etc", "/"], "must be absolute"),
        (["--prefix"], "needs a value"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path, args, message):
    result = install("--root", str(tmp_path / "root"), "--no-pip", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "root").exists()


def test_help():
    result = install("--help")
    for option in ("--prefix", "--etc", "--unit-dir", "--root", "--dry-run", "--uninstall"):
        assert option in result.stdout


# --- systemd units -----------------------------------------------------------------------


def test_units_carry_the_required_settings():
    service = (DEPLOY / "notifier.service").read_text()
    template = (DEPLOY / "notifier@.service").read_text()
    for unit in (service, template):
        for line in (
            "Type=notify",
            "NotifyAccess=main",
            "ExecStart=/opt/notifier/venv/bin/notifier run",
            "LoadCredential=smtp_password:/etc/notifier/smtp_password",
            "WatchdogSec=30",
            "Restart=on-failure",
            "RestartSec=2",
            "TimeoutStopSec=45",
            "DynamicUser=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        ):
            assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert re.search(r"^EnvironmentFile=/etc/notifier/notifier\.env$", service, re.M)
    assert re.search(r"^EnvironmentFile=-/etc/notifier/notifier\.env$", template, re.M)
    assert re.search(r"^EnvironmentFile=-/etc/notifier/notifier-%i\.env$", template, re.M)
    assert re.search(r"^Environment=NOTIFIER_WORKER_ID=%H-%i$", template, re.M)

    def sandbox(text: str) -> list[str]:
        return text.split("# --- Sandbox", 1)[1].splitlines()

    assert sandbox(template) == sandbox(service), "keep the two units' hardening in step"


def test_units_read_no_env_file_and_instances_get_their_own_metrics_port():
    """systemd loads the env file itself (the dynamic user could not read /etc/notifier);
    instance N of the template serves /metrics on METRICS_PORT + N."""
    service = (DEPLOY / "notifier.service").read_text()
    template = (DEPLOY / "notifier@.service").read_text()
    for unit in (service, template):
        assert re.search(r"^Environment=NOTIFIER_ENV_FILE=/dev/null$", unit, re.M)
    assert re.search(r"^Environment=NOTIFIER_METRICS_PORT_OFFSET=%i$", template, re.M)
    assert "NOTIFIER_METRICS_PORT_OFFSET=" not in service


def test_printed_check_command_uses_the_service_environment_only(tmp_path):
    out = install_root(tmp_path / "root").stdout
    assert "-p Environment=NOTIFIER_ENV_FILE=/dev/null" in out


def test_env_example_names_every_setting_and_nothing_else():
    from worker.settings import setting_names, unknown_variables

    text = (REPO / ".env.example").read_text(encoding="utf-8")
    assert [name for name in setting_names() if name not in text] == []
    assert unknown_variables(REPO / ".env.example", environ={}) == []


def test_stop_timeout_exceeds_the_worker_grace_period():
    service = (DEPLOY / "notifier.service").read_text()
    match = re.search(r"^TimeoutStopSec=(\d+)$", service, re.M)
    assert match
    assert int(match.group(1)) > 20  # NOTIFIER_SHUTDOWN_GRACE_S defaults to 20 s


def host_unit_dir() -> Path:
    for candidate in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(candidate) / "sysinit.target").exists():
            return Path(candidate)
    pytest.skip("no systemd unit directory with sysinit.target on this host")


def verify_root(tmp_path: Path) -> Path:
    """A root with notifier installed and the host's targets the units depend on."""
    root = tmp_path / "root"
    install_root(root)
    target_dir = root / "usr/lib/systemd/system"
    target_dir.mkdir(parents=True)
    for target in (
        "sysinit.target",
        "basic.target",
        "shutdown.target",
        "network-online.target",
        "multi-user.target",
    ):
        source = host_unit_dir() / target
        if source.exists():
            shutil.copy(source, target_dir / target)
    return root


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path):
    root = verify_root(tmp_path)
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={root}",
            "notifier.service",
            "notifier@test.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_catches_mistakes(tmp_path):
    # The negative control: the same setup does report a misspelt key.
    root = verify_root(tmp_path)
    unit_dir = root / "etc/systemd/system"
    broken = (DEPLOY / "notifier.service").read_text().replace("Type=notify", "Tpye=notify")
    (unit_dir / "broken.service").write_text(broken)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "broken.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown key" in result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_security_exposure(unit):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(DEPLOY / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    exposure = float(match.group(1))
    assert exposure <= 2.0, output


# --- Redis ---------------------------------------------------------------------------------


def test_redis_conf_has_the_durability_settings():
    text = (DEPLOY / "redis-notifier.conf").read_text()
    settings = {
        line.split(None, 1)[0]: line.split(None, 1)[1]
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    for lost in ("retr", "dead letter", "snapshot"):
        assert lost in text


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_accepts_the_conf(tmp_path):
    # A private redis-server on a unix socket only (port 0: no TCP at all).
    import redis

    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            str(DEPLOY / "redis-notifier.conf"),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--dir",
            str(tmp_path),
            "--daemonize",
            "no",
            "--logfile",
            str(tmp_path / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        with redis.Redis(unix_socket_path=str(sock), decode_responses=True) as client:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- Prometheus ----------------------------------------------------------------------------

ALERTS = DEPLOY / "prometheus/alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus/alerts_test.yml"


def metric_names(promql: str) -> set[str]:
    """The notifier_* metric names a PromQL expression reads (histogram series folded)."""
    names = set()
    for name in re.findall(r"\bnotifier_[a-z_]+\b", promql):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


@needs_promtool
@pytest.mark.parametrize(
    ("command", "path"), [("check", ALERTS), ("test", ALERTS_TEST)], ids=["check", "test"]
)
def test_promtool_rules(command, path):
    result = subprocess.run(
        ["promtool", command, "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test():
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M))
    assert {"NotifierDown", "NotifierAbsent", "NotifierDeadLetters"} <= alerts
    assert {
        "NotifierBacklogHigh",
        "NotifierBacklogGrowing",
        "NotifierLatencySLOBreach",
        "NotifierPausedOnConfigError",
        "NotifierRetriesClimbing",
        "NotifierStrategySilent",
    } <= alerts
    firing = set(
        re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", ALERTS_TEST.read_text())
    )
    assert alerts == firing


def test_alert_rules_use_only_exported_metrics():
    used = metric_names(ALERTS.read_text())
    assert used <= METRICS, used - METRICS
    assert 'up{job="notifier"}' in ALERTS.read_text()


# --- Grafana -------------------------------------------------------------------------------

DASHBOARD = DEPLOY / "grafana/notifier-dashboard.json"


def dashboard_panels() -> list[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for panel in panels:
            out.append(panel)
            out.extend(walk(panel.get("panels", [])))
        return out

    return walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def test_dashboard_loads_and_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    queries = dashboard_queries()
    assert queries
    used: set[str] = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names <= METRICS, (title, names - METRICS)
        used |= names
    # Every exported metric shows somewhere.
    assert used == METRICS, METRICS - used
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))


def test_dashboard_has_the_latency_quantiles():
    exprs = "\n".join(expr for _, expr in dashboard_queries())
    for histogram in HISTOGRAMS:
        for q in ("0.5", "0.95", "0.99"):
            assert re.search(
                rf"histogram_quantile\({q}, sum by \(le\) \(rate\({histogram}_bucket\{{", exprs
            ), (histogram, q)
    titles = {panel["title"] for panel in dashboard_panels()}
    for needed in ("In-flight sends", "Open SMTP connections", "Share delivered within target"):
        assert needed in titles


def test_dashboard_shows_silent_strategies_and_time_since_last_seen():
    panels = {panel["title"]: panel for panel in dashboard_panels()}
    table = panels["Watched strategies"]
    exprs = [target["expr"] for target in table["targets"]]
    assert exprs[0].startswith("max by (strategy) (notifier_strategy_silent{")
    assert exprs[1].startswith(
        "time() - max by (strategy) (notifier_strategy_last_seen_timestamp_seconds{"
    )
    assert all(target["instant"] and target["format"] == "table" for target in table["targets"])
    assert "SILENT" in json.dumps(table["fieldConfig"]) and "SILENT" in json.dumps(
        panels["Silence episodes"]["fieldConfig"]
    )


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses PromQL in rule files; JSON is valid YAML, so no YAML library is needed.
    substitutions = {"$__rate_interval": "5m", "$job": "notifier", "$instance": ".*"}
    rules = []
    for index, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
