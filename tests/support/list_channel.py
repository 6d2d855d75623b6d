"""A whole channel in one small module, as a new IM channel would be: its settings model and
a :class:`~worker.channels.base.Channel` subclass. It renders the neutral content as plain
text (within its size limit) and keeps what it "sent" in a list; a test can make its next
sends fail with any classified error."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field

from worker.channels import Channel, Health, Receipt
from worker.content import Alert, Digest, as_text, digest_as_text
from worker.errors import SendError, TransientError


class ListChannelSettings(BaseModel):
    """The settings model: what a [[channel]] table of this kind would hold."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    rate_per_minute: int = 0
    max_bytes: int = Field(default=2048, ge=64)


class ListChannel(Channel):
    kind = "list"

    def __init__(
        self,
        settings: ListChannelSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        health = Health(
            settings.name,
            clock=clock,
            throttle_base_s=1.0,
            throttle_cap_s=10.0,
            down_base_s=0.5,
            down_cap_s=5.0,
        )
        super().__init__(
            settings.name,
            priority=priority,
            health=health,
            per_minute=settings.rate_per_minute,
            window_s=60.0,
        )
        self.settings = settings
        self.sent: list[tuple[list[str], str]] = []
        self.failures: list[SendError] = []

    async def send(self, lane: int, content: Alert | Digest, recipients: Sequence[str]) -> Receipt:
        if self.failures:
            raise self.failures.pop(0)
        if isinstance(content, Digest):
            text = digest_as_text(content, max_bytes=self.settings.max_bytes)
        else:
            text = as_text(content, max_bytes=self.settings.max_bytes)
        self.sent.append((list(recipients), text))
        return Receipt(
            channel=self.name,
            mode="list",
            send_s=0.0,
            via_failover=self.priority > 0,
            subject=content.subject,
        )

    def classify(self, exc: BaseException) -> SendError:
        return exc if isinstance(exc, SendError) else TransientError(str(exc))

    async def probe(self) -> None:
        return None
