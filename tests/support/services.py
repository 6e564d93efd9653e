"""Isolated namespaces on the loopback PostgreSQL, Redis and RabbitMQ servers, one per test.

Each helper creates a fresh database / Redis DB index / RabbitMQ vhost so parallel tests never share
queues or tables, and removes it afterwards. A missing server skips the test with the reason; with
``REQUIRE_SERVICES=1`` (set by ``.ci/run``) it fails instead (:func:`service_missing`), so CI cannot pass by
skipping what it was meant to test. Orthanc, Chromium and the npm validator go through the same function.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import NoReturn

import pytest

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_CLAIMS = "retinalgpt-tests:redis-db:"


def service_missing(reason: str) -> NoReturn:
    """Skip the test because a service or tool it needs is missing -- or, where ``REQUIRE_SERVICES=1``
    (CI), fail it: there every service must be there."""
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1: required here)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_database(prefix: str = "rg") -> Iterator[str]:
    """A new empty PostgreSQL database; yields its SQLAlchemy URL (psycopg 3 driver)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        service_missing(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_claimed: dict[str, int] = {}


def _private_redis_index(redis) -> int:  # noqa: ANN001 - the redis module, imported lazily
    """A Redis DB index (1–15) this test process holds alone: claimed with SET NX in DB 0, so neither another
    xdist worker nor another test session on the machine gets it, and released when the process ends."""
    if "index" in _claimed:
        return _claimed["index"]
    admin = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_connect_timeout=5)
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for index in range(1, 16):
        if admin.set(f"{REDIS_CLAIMS}{index}", owner, nx=True, ex=6 * 3600):
            _claimed["index"] = index
            atexit.register(_release_redis_index, admin, index, owner)
            return index
    raise RuntimeError("no free Redis DB index: 15 test processes hold one each")


def _release_redis_index(admin, index: int, owner: str) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):
        if admin.get(f"{REDIS_CLAIMS}{index}") == owner.encode():
            admin.delete(f"{REDIS_CLAIMS}{index}")


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """This process's private Redis DB index, flushed before and after; yields ``redis://127.0.0.1:6379/N``."""
    redis = pytest.importorskip("redis")
    try:
        index = _private_redis_index(redis)
        client = redis.Redis(host="127.0.0.1", port=6379, db=index, socket_connect_timeout=5)
        client.flushdb()
    except redis.ConnectionError as exc:
        service_missing(f"Redis on 127.0.0.1:6379 is not reachable: {exc}")
    try:
        yield f"redis://127.0.0.1:6379/{index}"
    finally:
        client.flushdb()
        client.close()


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A new RabbitMQ virtual host for guest; yields ``amqp://guest:guest@127.0.0.1:5672/<vhost>``."""
    vhost = f"rg-{uuid.uuid4().hex[:10]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    try:
        ctl("add_vhost", vhost)
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        service_missing(f"RabbitMQ (rabbitmqctl) is not usable: {exc}")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
