"""A private Postfix instance for SMTP protocol tests and the benchmark (never the system one).

:class:`PostfixServer` writes its own ``main.cf`` and ``master.cf`` into a fresh
directory under the system temp dir, with its own queue, data directory, log file and
Maildir, and starts it with ``postfix -c CONFDIR start``. Its only listener is
``smtpd`` on ``127.0.0.1:<free port>``; it offers PIPELINING and CHUNKING (BDAT), as
Postfix does by default. ``/etc/postfix`` is only read (``postfix-files``), never written.

Mail to ``@example.net`` is delivered by the ``virtual`` agent into one Maildir
(:meth:`PostfixServer.messages`), everything else is discarded. A few addresses are
refused on purpose, to test error paths against a real server:

- ``MAIL FROM`` :data:`BLOCKED_SENDER` → 550, :data:`BUSY_SENDER` → 451 (checked at
  MAIL time: ``smtpd_delay_reject = no``);
- ``RCPT TO`` :data:`REFUSED_RECIPIENT` → 550;
- the end of the message from :data:`CONTENT_REJECTED_SENDER` → 554
  (``smtpd_end_of_data_restrictions``, which Postfix applies to ``BDAT ... LAST`` too);
- a message larger than :data:`MESSAGE_SIZE_LIMIT` → 552 to ``MAIL ... SIZE=``.

``postfix start`` waits for the master's initialisation status (``master -w``), which
includes binding the listener, so a zero exit status means this instance owns the port;
the tests never connect to the port before that. :meth:`stop` runs ``postfix -c CONFDIR
stop`` (which kills the master's process group after 5 s) and then checks that no
process is left whose working directory is this instance's queue (every Postfix daemon
runs there), killing any such straggler by its pid.

With ``tls_chain_file`` (a PEM file holding the private key, then the certificate chain,
e.g. trustme's ``private_key_and_cert_chain_pem``) ``smtpd`` also offers STARTTLS.

Postfix needs root to start (the master drops to ``mail_owner`` for its daemons), so
:func:`postfix_unavailable` says why the tests must be skipped when it is missing or the
tests are not run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import LocalServer, free_port

__all__ = [
    "BLOCKED_SENDER",
    "BUSY_SENDER",
    "CONTENT_REJECTED_SENDER",
    "MESSAGE_SIZE_LIMIT",
    "POSTFIX",
    "REFUSED_RECIPIENT",
    "PostfixServer",
    "PostfixServerError",
    "postfix_unavailable",
]

POSTFIX = "/usr/sbin/postfix"
MAIL_OWNER = "postfix"
BLOCKED_SENDER = "blocked@example.com"
BUSY_SENDER = "busy@example.com"
CONTENT_REJECTED_SENDER = "spam@example.com"
REFUSED_RECIPIENT = "nobody@example.net"
MESSAGE_SIZE_LIMIT = 200_000
STOP_TIMEOUT_S = 10.0

# Services the instance needs, without chroot (the queue is a plain temp dir).
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
virtual   unix  - n n -  - virtual
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000? 1 tlsmgr
"""


def postfix_unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None if it can."""
    if not os.access(POSTFIX, os.X_OK):
        return f"{POSTFIX} not installed (apt-get install postfix; make test installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"no {MAIL_OWNER!r} user (the postfix package creates it)"
    return None


class PostfixServerError(RuntimeError):
    """The private Postfix could not be started or stopped."""


class PostfixServer(LocalServer):
    """A private Postfix on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, tls_chain_file: Path | None = None) -> None:
        self.tls_chain_file = tls_chain_file
        self.root: Path | None = None
        self.port = 0
        self._started = False

    @property
    def conf_dir(self) -> Path:
        return self._root / "conf"

    @property
    def queue_dir(self) -> Path:
        return self._root / "queue"

    @property
    def maildir(self) -> Path:
        return self._root / "mail" / "inbox"

    @property
    def log_file(self) -> Path:
        return self._root / "maillog"

    @property
    def _root(self) -> Path:
        if self.root is None:
            raise PostfixServerError("not started")
        return self.root

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.conf_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            # Only this instance's configuration, whatever the caller's environment.
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
        )

    def _write_config(self) -> None:
        owner = pwd.getpwnam(MAIL_OWNER)
        root = self._root
        for sub in ("conf", "queue", "data", "mail"):
            (root / sub).mkdir()
        os.chown(root / "data", owner.pw_uid, owner.pw_gid)
        os.chown(root / "mail", owner.pw_uid, owner.pw_gid)
        (root / "conf" / "senders").write_text(
            f"{BLOCKED_SENDER} 550 5.7.1 Sender blocked by test policy\n"
            f"{BUSY_SENDER} 451 4.3.2 Sender busy, try again later\n"
        )
        (root / "conf" / "recipients").write_text(
            f"{REFUSED_RECIPIENT} 550 5.1.1 No such user here\n"
        )
        (root / "conf" / "content").write_text(
            f"{CONTENT_REJECTED_SENDER} 554 5.7.1 Message content rejected\n"
        )
        main_cf = f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = {MAIL_OWNER}
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = notifier-test.localdomain
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_transport = discard:
default_transport = discard:
relay_transport = discard:
virtual_mailbox_domains = example.net
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = static:inbox/
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
virtual_transport = virtual
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtpd_delay_reject = no
smtpd_sender_restrictions = check_sender_access texthash:{root}/conf/senders
smtpd_recipient_restrictions = check_recipient_access texthash:{root}/conf/recipients,
    permit_mynetworks, reject
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_end_of_data_restrictions = check_sender_access texthash:{root}/conf/content
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_junk_command_limit = 10000
smtpd_client_connection_rate_limit = 0
"""
        if self.tls_chain_file is not None:
            main_cf += (
                f"smtpd_tls_chain_files = {self.tls_chain_file}\n"
                "smtpd_tls_security_level = may\n"
                "smtpd_tls_loglevel = 0\n"
            )
        (root / "conf" / "main.cf").write_text(main_cf)
        (root / "conf" / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def start(self) -> None:
        reason = postfix_unavailable()
        if reason is not None:
            raise PostfixServerError(reason)
        # Not pytest's tmp_path: its 0700 parents would keep the postfix user out.
        self.root = Path(tempfile.mkdtemp(prefix="notifier-postfix-"))
        self.root.chmod(0o755)
        self.port = free_port()
        self._write_config()
        result = self._postfix("start")
        if result.returncode != 0:
            log = self.log()
            self._cleanup()
            raise PostfixServerError(
                f"postfix start failed ({result.returncode}): {result.stdout}{result.stderr}\n{log}"
            )
        self._started = True

    def _survivors(self) -> list[int]:
        """Pids of processes working in this instance's queue directory."""
        queue = str(self.queue_dir)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd == queue or cwd.startswith(queue + "/"):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if self._started:
                result = self._postfix("stop")
                self._started = False
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while (survivors := self._survivors()) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for pid in survivors:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if result.returncode != 0 or survivors:
                    raise PostfixServerError(
                        f"postfix stop: exit {result.returncode}, killed {survivors}: "
                        f"{result.stdout}{result.stderr}"
                    )
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def delivered(self) -> list[bytes]:
        """The bytes of every message delivered to the Maildir so far, in no order."""
        out: list[bytes] = []
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if folder.is_dir():
                out.extend(path.read_bytes() for path in folder.iterdir())
        return out

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str | None:
        """The first log line containing ``text`` within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def wait_for(self, marker: bytes, count: int, timeout: float = 15.0) -> list[bytes]:
        """Wait until ``count`` delivered messages contain ``marker``; return them.

        Delivery (queue manager, then the virtual agent) follows the 250 reply
        asynchronously. Returns what arrived by ``timeout``, possibly fewer.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [raw for raw in self.delivered() if marker in raw]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
