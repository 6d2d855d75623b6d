"""Shared test infrastructure. The servers the tests start and own (a private
``redis-server``, the aiosmtpd SMTP server with fault injection, a private Postfix) live in
:mod:`worker.devtools`, which the demo and the benchmark use too; here:

- :mod:`tests.support.tls`: a trustme CA and loopback server certificate;
- :mod:`tests.support.helpers`: helpers shared by the test modules.

The pytest fixtures built on them live in ``tests/conftest.py``.
"""
