"""The private ``redis-server`` used by tests lives in the package (the demo and the
benchmark start one too); re-exported here for the tests."""

from worker.devtools.redis_server import RedisServer, RedisServerError, free_port

__all__ = ["RedisServer", "RedisServerError", "free_port"]
