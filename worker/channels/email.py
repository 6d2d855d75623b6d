"""The e-mail channel: one SMTP account (the primary, or a failover account).

Its settings model is :class:`worker.settings.SmtpAccount`; its connections are a
:class:`worker.mailer.SmtpPool` (one warm, authenticated, pipelined connection per lane);
it renders the neutral content as a MIME mail from the account's own sender; failures are
classified by :func:`worker.mailer.classify` (SMTP reply codes and the providers' throttle
texts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from email.utils import parseaddr
from typing import Any

from ..compose import Composer, Mail
from ..content import Alert, Digest
from ..errors import SendError
from ..mailer import SmtpPool, classify
from ..settings import Settings, SmtpAccount
from .base import Channel, Health, Receipt

__all__ = ["DOWN_BASE_S", "DOWN_MAX_S", "EmailChannel"]

DOWN_BASE_S = 1.0  # first cool-down step when the server is down (or RETRY_BASE_S, smaller)
DOWN_MAX_S = 30.0  # probe a down server at least this often: alerts cannot wait long


class EmailChannel(Channel):
    kind = "email"

    def __init__(
        self,
        account: SmtpAccount,
        *,
        priority: int,
        delivery: Settings,
        composer: Composer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        health = Health(
            account.smtp_account_name,
            clock=clock,
            throttle_base_s=delivery.throttle_base_s,
            throttle_cap_s=max(delivery.retry_max_s, delivery.throttle_base_s),
            down_base_s=min(DOWN_BASE_S, delivery.retry_base_s),
            down_cap_s=min(DOWN_MAX_S, delivery.retry_max_s),
        )
        super().__init__(
            account.smtp_account_name,
            priority=priority,
            health=health,
            per_minute=account.smtp_rate_per_minute or 0,
            window_s=account.smtp_rate_window_s,
        )
        self.account = account
        self.pool = SmtpPool(account, lanes=delivery.concurrency)
        self.composer = composer
        self.sender = account.mail_from or ""
        self.from_address = parseaddr(self.sender)[1]

    def render(self, content: Alert | Digest, recipients: Sequence[str]) -> Mail:
        """The content as a MIME mail from this account's own sender."""
        if isinstance(content, Digest):
            return self.composer.render_digest(
                content, recipients=list(recipients), sender=self.sender or None
            )
        return self.composer.render_mail(
            content, recipients=list(recipients), sender=self.sender or None
        )

    async def send(self, lane: int, content: Alert | Digest, recipients: Sequence[str]) -> Receipt:
        mail = self.render(content, recipients)
        t0 = time.perf_counter()
        try:
            _result, timing = await self.pool.lane(lane).send(
                self.from_address, recipients, mail.data
            )
        except SendError:
            raise
        except Exception as exc:  # anything unexpected is classified, never a crash
            raise self.classify(exc) from None
        return Receipt(
            channel=self.name,
            mode=timing.mode,
            send_s=time.perf_counter() - t0,
            connect_s=timing.connect,
            refused=dict(timing.refused),
            via_failover=self.priority > 0,
            message_id=mail.message_id,
            subject=mail.subject,
        )

    def classify(self, exc: BaseException) -> SendError:
        return classify(exc, self.account.smtp_provider)

    async def probe(self) -> None:
        await self.pool.connections[0].open()

    async def warm_up(self) -> list[SendError]:
        return await self.pool.warm_up()

    async def close_idle(self) -> None:
        await self.pool.close_idle()

    async def close(self) -> None:
        await self.pool.close()

    @property
    def open_connections(self) -> int:
        return self.pool.open_connections

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "host": self.account.smtp_host}
