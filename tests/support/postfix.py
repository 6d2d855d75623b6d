"""The private Postfix instance lives in the package (``notifier bench`` starts one too);
re-exported here for the tests."""

from worker.devtools.postfix import (
    BLOCKED_SENDER,
    BUSY_SENDER,
    CONTENT_REJECTED_SENDER,
    MESSAGE_SIZE_LIMIT,
    POSTFIX,
    REFUSED_RECIPIENT,
    PostfixServer,
    PostfixServerError,
    postfix_unavailable,
)

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
