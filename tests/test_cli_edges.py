"""The `notifier` command at the edges: settings and environment problems as one line, pipes
closed early, unknown variables, where the env file comes from, the sender address, stats for
humans and dead letters without an id. Real subprocesses, real redis-server and SMTP servers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.helpers import REPO_ROOT, clean_env, queued
from worker import settings as settings_module

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code, self.out, self.err = proc.returncode, proc.stdout, proc.stderr

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def full_env(env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), **env, "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    path = tmp_path / "cwd"
    path.mkdir()
    return path


@pytest.fixture
def notifier(cwd: Path):
    def run(*args: str, env: dict[str, str], timeout: float = 30) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "worker", *args],
            cwd=cwd,
            env=full_env(env),
            input="",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(proc)

    return run


@pytest.fixture
def env(redis_url: str) -> dict[str, str]:
    return {"NOTIFIER_REDIS_URL": redis_url}


def free_run_of_ports(n: int) -> int:
    """A port P with P .. P+n-1 free on the loopback (probed by binding them)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no run of free ports")


def assert_one_line(res: Result, command: str, start: str) -> str:
    assert res.code == 2, res
    assert "Traceback" not in res.out + res.err, res
    assert len(res.err_lines) == 1, res
    line = res.err_lines[0]
    assert line.startswith(f"notifier {command}: {start}"), res
    return line


# -- 1. settings and environment problems: one line, exit 2 -------------------------------------


@pytest.mark.parametrize(
    "command", [["run", "--burst"], ["check"], ["send-test", "--to", "a@b.cn"]]
)
def test_missing_ca_file(notifier, redis_url, smtp_factory, worker_env, tmp_path, command):
    smtp = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    missing = tmp_path / "company-ca.pem"
    res = notifier(*command, env=worker_env(redis_url, smtp, smtp_ca_file=missing))
    line = assert_one_line(res, command[0], f"NOTIFIER_SMTP_CA_FILE: {missing}: no such file")
    assert "unset" in line


def test_metrics_port_in_use(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        res = notifier("run", "--burst", env=worker_env(redis_url, smtp, metrics_port=port))
    finally:
        held.close()
    line = assert_one_line(res, "run", f"NOTIFIER_METRICS_PORT: 127.0.0.1:{port} is already in use")
    assert "NOTIFIER_METRICS_PORT_OFFSET" in line  # how template instances get their own


def test_template_instances_get_their_own_metrics_port(
    notifier, redis_url, smtp_factory, worker_env, worker_proc
):
    """What deploy/notifier@.service does: the instance name is the port offset."""
    from tests.support.helpers import wait_started

    smtp = smtp_factory(auth={USER: PASSWORD})
    base = free_run_of_ports(3)
    for instance in ("1", "2"):
        env = worker_env(
            redis_url,
            smtp,
            metrics_port=base,
            metrics_port_offset=instance,
            worker_id=f"host-{instance}",
        )
        wait_started(worker_proc(env))
    for offset in (1, 2):
        with socket.create_connection(("127.0.0.1", base + offset), timeout=2) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert b"notifier_queue_depth" in sock.makefile("rb").read()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{% if %}", "mail.txt.j2 line 1: "),
        (b"\xff\xfe broken", "mail.txt.j2: not UTF-8"),
    ],
)
def test_broken_template_dir(
    notifier, redis_url, smtp_factory, worker_env, tmp_path, content, words
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    templates = tmp_path / "templates"
    templates.mkdir()
    target = templates / "mail.txt.j2"
    target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    for command in ("run", "check"):
        res = notifier(command, env=worker_env(redis_url, smtp, template_dir=templates))
        line = assert_one_line(res, command, f"NOTIFIER_TEMPLATE_DIR: {templates}/")
        assert words in line


def test_missing_template_dir(notifier, redis_url, smtp_factory, worker_env, tmp_path):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("run", env=worker_env(redis_url, smtp, template_dir=tmp_path / "nope"))
    assert_one_line(res, "run", f"NOTIFIER_TEMPLATE_DIR: {tmp_path / 'nope'}: no such directory")


@pytest.mark.parametrize("setting", ["routes_file", "accounts_file"])
def test_toml_syntax_error(notifier, redis_url, smtp_factory, worker_env, tmp_path, setting):
    smtp = smtp_factory(auth={USER: PASSWORD})
    path = tmp_path / "x.toml"
    path.write_text('[[x]]\nname = "a"\nto = [1,\n')
    res = notifier("run", env=worker_env(redis_url, smtp, **{setting: path}))
    line = assert_one_line(res, "run", f"NOTIFIER_{setting.upper()}={path}: not valid TOML")
    assert re.search(r"at line \d+, column \d+", line), line


def test_bad_redis_url_is_one_line(notifier):
    res = notifier("stats", env={"NOTIFIER_REDIS_URL": "localhost:6379"})
    assert_one_line(res, "stats", "NOTIFIER_REDIS_URL: ")


# -- 2. a pipe closed early ------------------------------------------------------------------------


def closed_early(cwd: Path, env: dict[str, str], *args: str, read_lines: int) -> tuple[int, str]:
    """Run ``notifier ARGS | head -READ_LINES``: exit code and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=full_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    for _ in range(read_lines):
        assert proc.stdout.readline()
    proc.stdout.close()
    try:
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, proc.stderr.read().decode()


def seed_many_dead(r, n: int) -> None:
    letter = {
        "event": json.dumps({"subject": "x" * 200}),
        "id": "",
        "reason": "permanent",
        "error": "550 no such user",
        "attempts": 1,
        "failed_at": time.time(),
    }
    pipe = r.pipeline()
    for i in range(n):
        pipe.lpush("notifier:dead", json.dumps({**letter, "id": f"e{i}"}))
    pipe.execute()


@pytest.mark.parametrize(
    ("args", "read_lines"),
    [
        (("dead", "list", "--limit", "3000"), 1),
        (("dead", "list", "--json", "--limit", "3000"), 1),
        (("stats",), 0),
        (("stats", "--json"), 0),
        (("stats", "--watch", "0.05"), 1),
        (("stats", "--json", "--watch", "0.05"), 1),
    ],
)
def test_pipe_closed_early_is_a_quiet_exit_0(cwd, env, r, args, read_lines):
    seed_many_dead(r, 3000)
    code, err = closed_early(cwd, env, *args, read_lines=read_lines)
    assert (code, err) == (0, "")


# -- 3. unknown NOTIFIER_* variables -----------------------------------------------------------------


def test_check_fails_on_an_unknown_variable(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(redis_url, smtp, concurency="8"))
    assert res.code == 1, res
    assert (
        "settings   FAIL: NOTIFIER_CONCURENCY (in the environment) is not a setting: "
        "did you mean NOTIFIER_CONCURRENCY?"
    ) in res.out
    assert "smtp       ok: " in res.out


def test_run_warns_about_an_unknown_variable(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("run", "--burst", env=worker_env(redis_url, smtp, concurency="8"))
    assert res.code == 0, res
    assert re.search(
        r"WARNING worker\.cli: NOTIFIER_CONCURENCY \(in the environment\) is not a "
        r"setting: did you mean NOTIFIER_CONCURRENCY\?",
        res.out,
    ), res


def test_a_misspelt_password_is_named_before_the_login_is_blamed(
    notifier, redis_url, smtp_factory, worker_env
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp, smtp_provider="qq", smtp_password=None, smtp_pasword=PASSWORD)
    res = notifier("send-test", "--to", "me@example.com", env=env)
    assert res.code != 0, res
    text = res.out + res.err
    typo = text.index(
        "NOTIFIER_SMTP_PASWORD (in the environment) is not a setting: did you "
        "mean NOTIFIER_SMTP_PASSWORD?"
    )
    blame = [m.start() for m in re.finditer("授权码|NOTIFIER_SMTP_PASSWORD: not set", text)]
    assert blame and typo < min(blame), res
    assert PASSWORD not in text
    # run refuses to start, and says why in the same line
    res = notifier("run", env=env)
    line = assert_one_line(res, "run", "NOTIFIER_SMTP_PASSWORD: not set")
    assert "NOTIFIER_SMTP_PASWORD" in line


# -- 4. the env file, from any directory ------------------------------------------------------------


def test_env_file_option_on_every_command(notifier, redis_url, r, tmp_path):
    env_file = tmp_path / "custom.env"
    env_file.write_text(f"NOTIFIER_REDIS_URL={redis_url}\nNOTIFIER_KEY_PREFIX=opt\n")
    assert notifier("--env-file", str(env_file), "push", "before", env={}).code == 0
    assert notifier("push", "after", "--env-file", str(env_file), env={}).code == 0
    assert [e.subject for e in queued(r, "opt")] == ["before", "after"]
    for args in (["stats"], ["dead", "list"], ["dead", "replay", "--all"]):
        res = notifier(*args, "--env-file", str(env_file), env={})
        assert res.code == 0, (args, res)
    res = notifier("stats", "--json", env={"NOTIFIER_ENV_FILE": str(env_file)})
    assert json.loads(res.out)["depths"]["queue"] == 2
    res = notifier("stats", "--env-file", str(tmp_path / "nope.env"), env={})
    assert_one_line(res, "stats", f"--env-file {tmp_path / 'nope.env'}: no such file")


def test_run_says_where_its_settings_came_from(
    notifier, redis_url, smtp_factory, worker_env, tmp_path
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp)
    res = notifier("run", "--burst", env=env)
    assert res.code == 0, res
    assert "no env file; environment only" in res.out
    env_file = tmp_path / "notifier.env"
    env_file.write_text("NOTIFIER_CONCURRENCY=2\n")
    res = notifier("run", "--burst", "--env-file", str(env_file), env=env)
    assert res.code == 0, res
    assert f"settings from {env_file}" in res.out


def readme_commands(section: str) -> list[list[str]]:
    """The `notifier ...` commands an operator copies from a README section."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    out = []
    for m in re.finditer(
        r"(?:^|[\s`])(?:\S*/)?notifier ((?:stats|dead|check)\b[^`\n\\]*)",
        text[start : end if end > 0 else None],
    ):
        args = m.group(1).split("#")[0].split()
        if all(arg.isascii() for arg in args):  # not a placeholder such as `--id 句柄`
            out.append(args)
    return out


def test_readme_operator_commands_work_from_any_directory(
    redis_url, r, smtp_factory, tmp_path, monkeypatch, capsys
):
    """`sudo /opt/notifier/venv/bin/notifier stats --window 1h` from anywhere reads the
    installer's /etc/notifier/notifier.env."""
    from worker.cli import main

    clean_env(monkeypatch, tmp_path)
    smtp = smtp_factory(auth={USER: PASSWORD})
    system = tmp_path / "etc" / "notifier.env"
    system.parent.mkdir()
    system.write_text(
        f"NOTIFIER_REDIS_URL={redis_url}\nNOTIFIER_SMTP_HOST=127.0.0.1\n"
        f"NOTIFIER_SMTP_PORT={smtp.port}\nNOTIFIER_SMTP_USERNAME={USER}\n"
        f"NOTIFIER_SMTP_PASSWORD={PASSWORD}\nNOTIFIER_MAIL_TO=trader@example.com\n"
    )
    monkeypatch.setattr(settings_module, "SYSTEM_ENV_FILE", system)
    r.lpush(
        "notifier:dead",
        json.dumps(
            {
                "event": '{"subject":"s"}',
                "id": "",
                "reason": "x",
                "error": "e",
                "attempts": 1,
                "failed_at": 0,
            }
        ),
    )
    commands = readme_commands("### Start and check") + readme_commands("## 中文快速上手")
    names = {" ".join(c[:2]) for c in commands}
    assert {"stats --window", "check", "dead list", "dead replay"} <= names, commands
    for args in commands:
        assert main(args) == 0, (args, capsys.readouterr())
    assert "queue notifier:queue on " in capsys.readouterr().out
    assert len(queued(r)) == 1  # the dead letter without an id went back


# -- 5. check names the queue ------------------------------------------------------------------------


def test_check_names_the_queue(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(redis_url, smtp, key_prefix="desk"))
    assert res.code == 0, res
    assert f"queue desk:queue on {redis_url}" in res.out


def test_check_names_events_waiting_under_another_prefix(
    notifier, redis_url, smtp_factory, worker_env
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    r = redis.Redis.from_url(redis_url)
    r.lpush("notifier:queue", json.dumps({"subject": "pushed by a producer with the default"}))
    r.close()
    res = notifier("check", env=worker_env(redis_url, smtp, key_prefix="desk"))
    (line,) = [x for x in res.out.splitlines() if "notifier:queue" in x]
    assert line.startswith("redis      WARNING: 1 event(s) wait in notifier:queue"), line
    assert "NOTIFIER_KEY_PREFIX=notifier" in line


# -- 6. the sender address -----------------------------------------------------------------------


def test_sender_other_than_the_account(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp, smtp_provider="qq", mail_from="量化 <desk@example.com>")
    res = notifier("check", env=env)
    assert res.code == 0, res
    (line,) = [x for x in res.out.splitlines() if "NOTIFIER_MAIL_FROM" in x]
    assert line.startswith("settings   WARNING: NOTIFIER_MAIL_FROM: desk@example.com")
    assert USER in line
    res = notifier("run", "--burst", env=env)
    assert res.code == 0, res
    assert re.search(r"WARNING worker\.cli: NOTIFIER_MAIL_FROM: desk@example\.com", res.out)


# -- 8. stats for humans ---------------------------------------------------------------------------


def seed_stats(r) -> None:
    now = time.time()
    for rec in (
        {"t": now - 3, "o": "sent", "id": "a", "l": 0.02, "w": 0.001, "s": 0.01},
        {"t": now - 2, "o": "dead", "id": "b", "reason": "invalid"},
        {"t": now - 1, "o": "dead", "id": "c", "reason": "invalid"},
        {"t": now, "o": "dead", "id": "d", "reason": "recipient"},
    ):
        r.lpush("notifier:deliveries", json.dumps(rec))
    group = "qq.0123456789abcdef"
    r.zadd("notifier:digests", {group: now + 30})
    r.rpush(
        f"notifier:held:{group}",
        json.dumps({"id": "h1", "subject": "s", "ts": now - 130}),
        json.dumps({"id": "h2", "subject": "s", "ts": now - 20}),
    )
    r.set("notifier:paused", json.dumps({"worker": "w1", "reason": "535 login", "at": now}))


def test_stats_text_is_for_humans(notifier, env, r):
    seed_stats(r)
    res = notifier("stats", env=env)
    assert res.code == 0, res
    assert "{" not in res.out and "}" not in res.out, res.out
    assert "dead 3 (invalid 2, recipient 1)" in res.out
    assert re.search(
        r"held for a digest: account qq: 2 event\(s\), oldest 2m1\ds, "
        r"sent in \d+ s",
        res.out,
    ), res.out
    st = json.loads(notifier("stats", "--json", env=env).out)
    (held,) = st["held"]
    assert (held["account"], held["events"]) == ("qq", 2)
    assert 125 < held["oldest_age_s"] < 140


def test_stats_watch_prints_the_time_of_each_snapshot(cwd, env, r):
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "stats", "--watch", "0.1"],
        cwd=cwd,
        env=full_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=1.5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=5)
    stamps = re.findall(r"^notifier stats at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", out, re.M)
    assert len(stamps) >= 3, out
    assert "\033[" not in out  # no screen clearing into a pipe


# -- 9. dead letters without an id -------------------------------------------------------------------


def seed_dead(r) -> None:
    now = time.time()
    for letter in (
        {
            "event": '{"id":"e1","subject":"one"}',
            "id": "e1",
            "reason": "exhausted",
            "error": "gave up",
            "attempts": 8,
            "failed_at": now - 60,
        },
        {
            "event": "not json at all",
            "id": "",
            "reason": "invalid",
            "error": "event is not JSON",
            "attempts": 0,
            "failed_at": now - 30,
        },
        {
            "event": '{"subject":"no id, valid"}',
            "id": "",
            "reason": "permanent",
            "error": "550 mailbox full",
            "attempts": 1,
            "failed_at": now - 20,
        },
        {
            "event": '{"v":2,"subject":"from the future"}',
            "id": "",
            "reason": "invalid",
            "error": "contract version 2",
            "attempts": 0,
            "failed_at": now - 10,
        },
    ):
        r.lpush("notifier:dead", json.dumps(letter))


def handles(notifier, env) -> dict[str, str]:
    """Dead letter error -> its handle, from `dead list --json`."""
    res = notifier("dead", "list", "--json", env=env)
    return {row["error"]: row["handle"] for row in map(json.loads, res.out.splitlines())}


def test_every_dead_letter_has_a_handle_replay_can_reach(notifier, env, r):
    seed_dead(r)
    h = handles(notifier, env)
    assert len(set(h.values())) == 4 and all(re.fullmatch(r"[0-9a-f]{8}", x) for x in h.values())
    text = notifier("dead", "list", env=env).out
    for handle in h.values():
        assert handle in text
    res = notifier("dead", "replay", "--id", h["550 mailbox full"], env=env)
    assert res.code == 0, res
    assert res.out.strip() == "replayed 1 event(s)"
    (e,) = queued(r)
    assert e.subject == "no id, valid" and e.meta is not None and e.meta.replayed
    res = notifier("dead", "replay", "--id", h["event is not JSON"], env=env)
    assert res.code == 1, res
    assert res.err_lines == [
        f"notifier dead: dead letter {h['event is not JSON']} is still invalid (event is not "
        "JSON: Expecting value: line 1 column 1 (char 0)); kept: fix it and queue it with "
        "`notifier push --json`"
    ]
    assert r.llen("notifier:dead") == 3


def test_replay_all_reports_what_is_still_invalid(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "replay", "--all", env=env)
    assert res.code == 0, res
    assert res.out.strip().splitlines()[-1] == (
        "replayed 2 event(s); 2 still invalid, kept as dead letters (see `notifier dead list`)"
    )
    assert sorted(e.subject for e in queued(r)) == ["no id, valid", "one"]
    assert r.llen("notifier:dead") == 2


# -- 10. check: settings ok or FAIL, never both --------------------------------------------------------


def test_check_never_says_ok_and_fail_for_settings(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(redis_url, smtp, mail_to=None))
    assert res.code == 1, res
    settings_lines = [x for x in res.out.splitlines() if x.startswith("settings ")]
    assert settings_lines[0].startswith("settings   FAIL: NOTIFIER_MAIL_TO: not set")
    assert not any(" ok: " in x for x in settings_lines), res


# -- Redis problems are named for what they are -------------------------------------------------------


def test_redis_problems_are_named_not_unreachable(notifier, redis_factory):
    full, locked = redis_factory(), redis_factory()
    with redis.Redis.from_url(full.url) as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
    with redis.Redis.from_url(locked.url) as admin:
        admin.config_set("requirepass", "sekrit")
    for args in (["push", "s"], ["dead", "purge", "--yes"]):
        res = notifier(*args, env={"NOTIFIER_REDIS_URL": full.url})
        assert res.code == 1, res
        assert res.err_lines == [
            f"notifier {args[0]}: Redis at {full.url} is full (OOM: "
            "maxmemory reached, policy noeviction): raise maxmemory or "
            "drain the queue (notifier stats / dead purge)"
        ], res
    for args in (["push", "s"], ["stats"], ["dead", "list"]):
        res = notifier(*args, env={"NOTIFIER_REDIS_URL": locked.url})
        assert res.code == 1, res
        assert len(res.err_lines) == 1 and "refused the password" in res.err, res
        assert "unreachable" not in res.err
    res = notifier("check", env={"NOTIFIER_REDIS_URL": locked.url})
    assert f"redis      FAIL: Redis at {locked.url} refused the password" in res.out, res


def test_push_with_the_units_environment(notifier, redis_url, r):
    """NOTIFIER_ENV_FILE=/dev/null (what the units set) is understood by the producer too."""
    res = notifier(
        "push", "s", env={"NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_ENV_FILE": "/dev/null"}
    )
    assert res.code == 0, res
    assert [e.subject for e in queued(r)] == ["s"]
