"""Failover between SMTP accounts (worker/channels/email.py, worker/deliver.py): the primary from
NOTIFIER_SMTP_*, a secondary from NOTIFIER_ACCOUNTS_FILE, two aiosmtpd servers.

The primary starts answering QQ's ``550 Connection frequency limited`` (throttled), is
stopped (down) or refuses the login with 535 (paused): new sends go to the secondary without
loss or delay, and come back to the primary once it recovers. In-process with a fake clock
first, then with real ``notifier run`` processes, ``notifier check`` and ``notifier stats``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.helpers import (
    QQ_535,
    QQ_THROTTLE,
    FakeClock,
    Rig,
    clean_env,
    dead_letters,
    event,
    push,
    run_cli,
    start_worker,
    unsettled,
    wait_until,
)
from worker.devtools.smtp_server import SMTPTestServer
from worker.settings import SettingsError, SmtpAccount, load_settings

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"
BACKUP_FROM = "backup@example.com"


def accounts_toml(backup: SMTPTestServer, **extra: Any) -> str:
    lines = ["[[account]]", 'name = "backup"', f'host = "{backup.host}"', f"port = {backup.port}",
             'tls = "none"', f'mail_from = "备用 <{BACKUP_FROM}>"']  # fmt: skip
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def write_accounts(tmp_path: Path, backup: SMTPTestServer, **extra: Any) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(accounts_toml(backup, **extra), encoding="utf-8")
    return path


def ids(smtp: SMTPTestServer) -> list[str]:
    return [str(m.message["X-Notifier-Event-Id"]) for m in smtp.messages]


# ============================================================================ in-process


class _Env:
    @pytest.fixture(autouse=True)
    def _no_notifier_env(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        clean_env(monkeypatch, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    # the channels' state (pauses, cool-downs) runs on the rig's clock
    return FakeClock(time.time())


@pytest.fixture
def two(smtp_factory, make_rig, tmp_path, clock) -> tuple[Rig, SMTPTestServer, SMTPTestServer]:
    primary, backup = smtp_factory(), smtp_factory()
    rig = make_rig(primary, clock, accounts_file=write_accounts(tmp_path, backup),
                   smtp_account_name="primary", throttle_base_s=1, retry_base_s=0.5,
                   retry_max_s=2)  # fmt: skip
    return rig, primary, backup


class TestInProcess(_Env):
    async def test_accounts_in_priority_order(self, two):
        rig, primary, backup = two
        assert [a.name for a in rig.channels] == ["primary", "backup"]
        assert [a.account.smtp_port for a in rig.channels] == [primary.port, backup.port]
        assert rig.channels[1].sender == f"备用 <{BACKUP_FROM}>"
        await rig.deliver(rig.event("e1"))
        assert ids(primary) == ["e1"] and ids(backup) == []  # the primary while it works

    @pytest.mark.parametrize("stage", ["MAIL", "DATA"])
    async def test_throttled_primary_fails_over_and_traffic_returns(self, two, clock, stage):
        rig, primary, backup = two
        primary.fail_next(stage, 550, QQ_THROTTLE)
        await rig.deliver(rig.event("e1"))
        assert ids(backup) == ["e1"] and ids(primary) == []
        mail = backup.messages[0]
        assert mail.mail_from == BACKUP_FROM
        assert mail.message["From"].addresses[0].addr_spec == BACKUP_FROM
        p, b = rig.channels
        assert (p.state, b.state) == ("throttled", "ok")
        assert "frequency limited" in p.reason
        assert rig.outcomes[-1].status == "sent" and rig.outcomes[-1].account == "backup"
        tried = primary.transactions
        await rig.deliver(rig.event("e2"))  # the primary cools down: not even tried
        assert ids(backup) == ["e1", "e2"] and primary.transactions == tried
        clock.advance(1.01)  # THROTTLE_BASE_S = 1: the cool-down is over
        await rig.deliver(rig.event("e3"), rig.event("e4"))
        assert ids(primary) == ["e3", "e4"]
        assert (p.state, p.reason) == ("ok", "")
        assert await rig.dead() == [] and await rig.leftovers() == {}
        assert all(o.latency < 1 for o in rig.outcomes if o.status == "sent")

    async def test_down_primary_fails_over_and_traffic_returns(self, two, clock):
        rig, primary, backup = two
        await rig.deliver(rig.event("e0"))  # a warm connection to the primary
        primary.stop()
        await rig.deliver(rig.event("e1"), rig.event("e2"))
        assert ids(backup) == ["e1", "e2"]
        p = rig.channels[0]
        assert p.state == "down"
        # cools down with the retry back-off (RETRY_BASE_S = 0.5 here), then probes
        assert 0 < p.retry_at() - clock.monotonic() <= 0.5
        tried = primary.connections
        await rig.deliver(rig.event("e2b"))
        assert ids(backup)[-1] == "e2b" and primary.connections == tried  # not even tried
        primary.start()
        clock.advance(0.51)
        await rig.deliver(rig.event("e3"))
        assert ids(primary) == ["e0", "e3"] and p.state == "ok"
        assert ids(backup) == ["e1", "e2", "e2b"]
        assert await rig.dead() == [] and await rig.leftovers() == {}

    async def test_paused_primary_fails_over_and_traffic_returns(
        self, smtp_factory, make_rig, tmp_path, clock
    ):
        primary, backup = smtp_factory(auth={USER: PASSWORD}), smtp_factory()
        rig = make_rig(primary, clock, accounts_file=write_accounts(tmp_path, backup),
                       smtp_username=USER, smtp_password=PASSWORD, smtp_provider=None)  # fmt: skip
        primary.auth_fail(535, QQ_535)
        await rig.deliver(rig.event("e1"))
        assert ids(backup) == ["e1"]
        p = rig.channels[0]
        assert p.state == "paused" and p.paused and "535" in p.reason
        await rig.deliver(rig.event("e2"))
        assert ids(backup) == ["e1", "e2"]
        primary.auth_fail(None)
        clock.advance(5.01)  # the first pause lasts 5 s, then a send probes the login
        await rig.deliver(rig.event("e3"))
        assert ids(primary) == ["e3"]
        assert (p.state, p.paused) == ("ok", False)
        assert await rig.dead() == [] and await rig.leftovers() == {}

    async def test_both_throttled_retries_without_losing_or_counting_attempts(self, two, clock):
        rig, primary, backup = two
        primary.fail_next("MAIL", 550, QQ_THROTTLE)
        backup.fail_next("MAIL", 550, QQ_THROTTLE)
        await rig.deliver(rig.event("e1"))
        out = rig.outcomes[-1]
        assert (out.status, out.reason, out.attempts) == ("retry", "throttled", 0)
        clock.advance(2.5)
        assert await rig.run_retries() == 1
        assert ids(primary) == ["e1"] and ids(backup) == []
        assert await rig.dead() == [] and await rig.leftovers() == {}

    async def test_every_account_cooling_down_waits_without_a_send(self, two, clock):
        rig, primary, backup = two
        primary.stop()
        backup.stop()
        await rig.deliver(rig.event("e1"))
        assert [a.state for a in rig.channels] == ["down", "down"]
        await rig.deliver(rig.event("e2"))  # nobody to try: a retry when the first is back
        out = rig.outcomes[-1]
        # down (not throttled) accounts: counted as a transient retry, but not an attempt
        assert (out.status, out.reason, out.attempts) == ("retry", "transient", 0)
        assert "every SMTP account is down" in out.error
        primary.start()
        backup.start()
        clock.advance(0.51)
        await rig.run_retries()
        assert sorted(ids(primary)) == ["e1", "e2"]
        assert await rig.dead() == [] and await rig.leftovers() == {}

    async def test_a_held_digest_fails_over_when_its_account_is_down(
        self, smtp_factory, make_rig, tmp_path, clock
    ):
        """Events held for the primary's digest must not wait for the primary to come back
        while the secondary works."""
        primary, backup = smtp_factory(), smtp_factory()
        rig = make_rig(primary, clock, accounts_file=write_accounts(tmp_path, backup),
                       smtp_rate_per_minute=1, smtp_rate_window_s=5)  # fmt: skip
        await rig.deliver(rig.event("a0"), rig.event("a1"), rig.event("a2"))
        assert ids(primary) == ["a0"] and (await rig.queue.depths()).held == 2
        primary.stop()
        for _ in range(4):  # 20 s with the primary down and the backup fine
            clock.advance(5.01)
            await rig.run_digest()
        got = [m for m in backup.messages if m.message["X-Notifier-Digest"] is not None]
        assert len(got) == 1, "the held events are still waiting for the primary"
        assert await rig.leftovers() == {}


class TestAccountsSettings(_Env):
    def test_fields_and_inheritance(self, tmp_path, smtp_server):
        (tmp_path / "pw").write_text("secret163\n")
        path = tmp_path / "a.toml"
        path.write_text(
            '[[account]]\nname = "netease"\nprovider = "163"\nusername = "me@163.com"\n'
            f'password_file = "{tmp_path / "pw"}"\nrate_per_minute = 9\nrate_window_s = 3\n'
            "timeout_s = 4\n\n"
            '[[account]]\nhost = "relay.example.com"\nport = 2525\ntls = "starttls"\n'
            'validate_certs = false\nmail_from = "relay@example.com"\n',
            encoding="utf-8",
        )
        s = load_settings(accounts_file=path, smtp_provider="qq", smtp_username="1@qq.com",
                          smtp_password="qqcode", mail_to=["trader@example.com"],
                          concurrency=3)  # fmt: skip
        qq, netease, relay = s.accounts()
        assert [a.smtp_account_name for a in (qq, netease, relay)] == ["qq", "netease", "account3"]
        assert (qq.smtp_host, qq.smtp_rate_per_minute) == ("smtp.qq.com", 20)
        assert (netease.smtp_host, netease.smtp_port, netease.smtp_tls) == ("smtp.163.com", 465,
                                                                            "ssl")  # fmt: skip
        assert netease.smtp_password is not None
        assert netease.smtp_password.get_secret_value() == "secret163"
        assert netease.mail_from == "me@163.com"  # its own address, not the primary's
        assert (netease.smtp_rate_per_minute, netease.smtp_rate_window_s) == (9, 3.0)
        assert netease.smtp_timeout_s == 4
        assert (relay.smtp_host, relay.smtp_port, relay.smtp_tls) == ("relay.example.com",
                                                                      2525, "starttls")  # fmt: skip
        assert relay.smtp_validate_certs is False
        assert (relay.smtp_username, relay.smtp_password) == (None, None)  # not the primary's
        assert relay.smtp_rate_per_minute == 0
        # an account holds its own SMTP settings only (one model, not a copy of Settings)
        assert isinstance(relay, SmtpAccount) and "concurrency" not in SmtpAccount.model_fields

    @pytest.mark.parametrize(
        ("text", "words"),
        [
            ('[[account]]\nhostname = "x"\n', "account 1: unknown key(s) hostname"),
            ('[[account]]\nname = "primary"\nhost = "x"\n', "two accounts named 'primary'"),
            ('[[account]]\nname = "b"\n[[account]]\nname = "b"\n', "two accounts named 'b'"),
            ('[[account]]\nname = "b"\nport = 0\n', "account 'b': port"),
            ('[[account]]\nname = "b"\nusername = "u@example.com"\n', "account 'b': no password"),
            ("[[account]\n", "not valid TOML"),
        ],
    )
    def test_errors_are_one_line_naming_the_file(self, tmp_path, text, words):
        path = tmp_path / "a.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SettingsError) as info:
            load_settings(accounts_file=path)
        msg = str(info.value)
        assert msg.startswith(f"NOTIFIER_ACCOUNTS_FILE={path}: ") and "\n" not in msg
        assert words in msg

    def test_accounts_file_from_the_environment(self, tmp_path, smtp_server, monkeypatch):
        """NOTIFIER_ACCOUNTS_FILE as an environment variable (systemd EnvironmentFile=)."""
        path = write_accounts(tmp_path, smtp_server)
        monkeypatch.setenv("NOTIFIER_ACCOUNTS_FILE", str(path))
        monkeypatch.setenv("NOTIFIER_MAIL_TO", "trader@example.com")
        s = load_settings()
        assert [a.smtp_account_name for a in s.accounts()] == ["primary", "backup"]


# ============================================================================ real workers


def stats(worker_proc: Any, env: dict[str, str], dotenv: str) -> dict[str, Any]:
    rc, out = run_cli(worker_proc, env, "stats", "--json", dotenv=dotenv)
    assert rc == 0, out
    return json.loads(out)


def heartbeat_states(r: redis.Redis) -> dict[str, str]:
    for key in r.scan_iter("notifier:worker:*"):
        raw = r.get(key)
        if raw:
            return {k: v["state"] for k, v in json.loads(raw)["accounts"].items()}
    return {}


class Pair:
    """A worker with a primary (env) and a backup account (NOTIFIER_ACCOUNTS_FILE in .env)."""

    def __init__(self, redis_url, smtp_factory, worker_env, worker_proc, tmp_path,
                 primary_auth: dict[str, str] | None = None) -> None:  # fmt: skip
        self.primary = smtp_factory(auth=primary_auth)
        self.backup = smtp_factory()
        self.env = worker_env(redis_url, self.primary, smtp_account_name="primary",
                              throttle_base_s=1, retry_base_s=0.5, retry_max_s=2,
                              heartbeat_ttl_s=2, shutdown_grace_s=2)  # fmt: skip
        path = write_accounts(tmp_path, self.backup)
        # .env: NOTIFIER_ACCOUNTS_FILE in the environment is refused (see
        # TestAccountsSettings.test_accounts_file_from_the_environment)
        self.dotenv = f"NOTIFIER_ACCOUNTS_FILE={path}\n"
        self.worker_proc = worker_proc
        self.proc = start_worker(worker_proc, self.env, dotenv=self.dotenv)
        assert "failover backup" in (self.proc.log_path.read_text("utf-8"))
        self.r = redis.Redis.from_url(redis_url)
        self.n = 0
        self.pushed: dict[str, float] = {}

    def send(self, count: int = 1, gap_s: float = 0.05) -> list[str]:
        out = []
        for _ in range(count):
            self.n += 1
            ev = event(f"e{self.n:03d}")
            self.pushed[ev["id"]] = ev["ts"]
            push(self.r, ev)
            out.append(ev["id"])
            time.sleep(gap_s)
        return out

    def where(self) -> dict[str, str]:
        out = {i: "primary" for i in ids(self.primary)}
        out.update({i: "backup" for i in ids(self.backup)})
        return out

    def wait(self, event_ids: list[str], timeout: float = 5) -> None:
        wait_until(lambda: set(event_ids) <= set(self.where()), timeout,
                   f"{event_ids} delivered")  # fmt: skip

    def stats(self) -> dict[str, Any]:
        return stats(self.worker_proc, self.env, self.dotenv)

    def check_no_loss_no_delay(self) -> None:
        got = Counter(ids(self.primary) + ids(self.backup))
        assert got == Counter(dict.fromkeys(self.pushed, 1))  # each exactly once
        received = {str(m.message["X-Notifier-Event-Id"]): m.received_at
                    for m in self.primary.messages + self.backup.messages}  # fmt: skip
        slow = {i: round(received[i] - ts, 3) for i, ts in self.pushed.items()
                if received[i] - ts > 1.0}  # fmt: skip
        assert slow == {}, "events delayed by the failover"
        assert dead_letters(self.r) == []
        assert unsettled(self.r) == {}

    def close(self) -> None:
        self.r.close()


@pytest.fixture
def pair(redis_url, smtp_factory, worker_env, worker_proc, tmp_path):
    made: list[Pair] = []

    def make(**kwargs: Any) -> Pair:
        p = Pair(redis_url, smtp_factory, worker_env, worker_proc, tmp_path, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_qq_frequency_limited_fails_over_and_comes_back(pair):
    p = pair()
    first = p.send(2)
    p.wait(first)
    assert p.where() == dict.fromkeys(first, "primary")
    p.primary.fail_next("MAIL", 550, QQ_THROTTLE, count=10_000)  # until told otherwise
    during = p.send(6, gap_s=0.15)
    p.wait(during)
    assert all(p.where()[i] == "backup" for i in during)
    wait_until(lambda: heartbeat_states(p.r).get("primary") == "throttled", 3, "heartbeat")
    st = p.stats()
    assert st["accounts"]["primary"]["state"] == "throttled"
    assert "frequency limited" in st["accounts"]["primary"]["reason"]
    assert st["accounts"]["backup"]["state"] == "ok"
    assert p.backup.messages[0].mail_from == BACKUP_FROM

    p.primary.clear_faults()  # the provider lets us send again
    deadline = time.monotonic() + 8
    after: list[str] = []
    while time.monotonic() < deadline:
        after += p.send(1, gap_s=0.2)
        if any(p.where().get(i) == "primary" for i in after):
            break
    p.wait(after)
    assert any(p.where()[i] == "primary" for i in after), "traffic did not return"
    back = p.send(3)
    p.wait(back)
    assert [p.where()[i] for i in back] == ["primary"] * 3
    p.check_no_loss_no_delay()
    wait_until(lambda: heartbeat_states(p.r).get("primary") == "ok", 3, "heartbeat")
    assert p.stats()["accounts"]["primary"]["state"] == "ok"


def test_down_primary_fails_over_and_comes_back(pair):
    p = pair()
    p.wait(p.send(1))
    p.primary.stop()
    during = p.send(4, gap_s=0.1)
    p.wait(during)
    assert [p.where()[i] for i in during] == ["backup"] * 4
    wait_until(lambda: heartbeat_states(p.r).get("primary") == "down", 3, "heartbeat")
    assert p.stats()["accounts"]["primary"]["state"] == "down"
    p.primary.start()
    deadline = time.monotonic() + 8
    after: list[str] = []
    while time.monotonic() < deadline and not any(p.where().get(i) == "primary" for i in after):
        after += p.send(1, gap_s=0.2)
    p.wait(after)
    assert any(p.where()[i] == "primary" for i in after), "traffic did not return"
    back = p.send(2)
    p.wait(back)
    assert [p.where()[i] for i in back] == ["primary"] * 2
    p.check_no_loss_no_delay()


def test_paused_primary_on_535_fails_over_and_comes_back(pair):
    p = pair(primary_auth={USER: PASSWORD})
    p.wait(p.send(1))
    p.primary.auth_fail(535, QQ_535)
    p.primary.stop()  # drop the warm connections: the next send must log in again
    p.primary.start()
    during = p.send(3, gap_s=0.1)
    p.wait(during)
    assert [p.where()[i] for i in during] == ["backup"] * 3
    wait_until(lambda: heartbeat_states(p.r).get("primary") == "paused", 3, "heartbeat")
    st = p.stats()
    assert st["accounts"]["primary"]["state"] == "paused"
    assert "535" in st["accounts"]["primary"]["reason"]
    assert st["paused"] is None  # the worker is not paused: the backup works
    p.primary.auth_fail(None)
    deadline = time.monotonic() + 9  # the first pause lasts 5 s
    after: list[str] = []
    while time.monotonic() < deadline and not any(p.where().get(i) == "primary" for i in after):
        after += p.send(1, gap_s=0.25)
    p.wait(after)
    assert any(p.where()[i] == "primary" for i in after), "traffic did not return"
    p.check_no_loss_no_delay()


def test_check_prints_every_account(redis_url, smtp_factory, worker_env, worker_proc, tmp_path):
    primary, backup = smtp_factory(), smtp_factory()
    env = worker_env(redis_url, primary, smtp_account_name="primary")
    dotenv = f"NOTIFIER_ACCOUNTS_FILE={write_accounts(tmp_path, backup, rate_per_minute=9)}\n"
    rc, out = run_cli(worker_proc, env, "check", dotenv=dotenv)
    assert rc == 0, out
    lines = {line.split(" ok:")[0].strip(): line for line in out.splitlines() if " ok:" in line}
    assert f"127.0.0.1:{primary.port} (none)" in lines["smtp primary"]
    assert f"127.0.0.1:{backup.port} (none), failover 1" in lines["smtp backup"]
    assert "limit 9/min" in lines["smtp backup"]
    assert (primary.transactions, backup.transactions) == (0, 0)  # sends nothing
    backup.stop()
    rc, out = run_cli(worker_proc, env, "check", dotenv=dotenv)
    assert rc == 1
    assert any(line.startswith("smtp backup FAIL (transient)") for line in out.splitlines()), out
    assert any(line.startswith("smtp primary ok:") for line in out.splitlines()), out


def test_check_with_accounts_file_in_the_environment(
    redis_url, smtp_factory, worker_env, worker_proc, tmp_path
):
    primary, backup = smtp_factory(), smtp_factory()
    env = worker_env(redis_url, primary, smtp_account_name="primary",
                     accounts_file=write_accounts(tmp_path, backup))  # fmt: skip
    rc, out = run_cli(worker_proc, env, "check")
    assert rc == 0, out
    assert "smtp backup" in out and "failover 1" in out
