"""Fixtures shared by the test modules, and the check on the ``integration`` marker.

Plain helpers stay where the tests import them from: ``tests/test_storage_support.py``
(the test Redis URL, ``require_redis``, ``drop_prefix``, ``free_port``, ``RedisProcess``,
``images``) and ``tests/test_server_support.py`` (image files, test versions, ``stack_env``).

Redis. The storage tests use the machine's Redis, database 13 (``BSCE_TEST_REDIS_URL``), and
an embedded one; the server and load tests use database 12 (``BSCE_TEST_SERVER_REDIS_URL``).
Every test works under a key prefix of its own and deletes only that prefix's keys, never a
whole database. A missing Redis fails the tests that need it; it never skips them.

Markers (``pyproject.toml``). ``integration``: the test starts or needs Redis, a learner worker
or ``bentoml serve``, or trains on real data for long; ``make test-unit`` leaves these out.
A test that takes one of the Redis fixtures below without that marker stops the run at
collection, and one that calls ``require_redis`` without it fails: a unit run never needs
Redis.

Fixtures are defined as ``fixture_<name>`` with ``name=<name>``, so that no parameter shadows
a function of this module.

The storage layer, the Redis client and torch are imported inside the fixtures: a unit run
does not import them through this file.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis

    from storage import Storage
    from tests.test_storage_support import RedisProcess

# Fixtures that need a Redis (``r`` takes its server by name, so its dependency is not seen).
REDIS_FIXTURES = frozenset(
    {"machine_redis", "embedded_redis", "r", "server_redis", "redis_process"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use Redis but are not marked `integration` (pytestmark = "
            "pytest.mark.integration, or @pytest.mark.integration):\n  " + "\n  ".join(unmarked)
        )


@pytest.fixture(name="_unit_tests_stay_off_redis", autouse=True)
def fixture_unit_tests_stay_off_redis(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test without the ``integration`` marker that calls ``require_redis`` (directly or
    through a fixture of its module) fails, whether or not a Redis answers."""
    if request.node.get_closest_marker("integration") is not None:
        return
    import tests.test_storage_support as support

    def refuse(url: str | None = None, *args: object, **kwargs: object) -> None:
        pytest.fail(
            f"{request.node.nodeid} reaches for the Redis at {url}: mark it `integration` "
            "(pytestmark = pytest.mark.integration, or @pytest.mark.integration)"
        )

    # require_redis connects through this module global, whoever imported require_redis.
    monkeypatch.setattr(support, "connect", refuse)


# -- the storage tests' Redis: the machine's (database 13) and an embedded one ---------------


@pytest.fixture(name="machine_redis", scope="session")
def fixture_machine_redis() -> Iterator[redis.Redis]:
    from tests.test_storage_support import TEST_REDIS_URL, require_redis

    r = require_redis(TEST_REDIS_URL)
    yield r
    r.close()


@pytest.fixture(name="embedded_redis", scope="session")
def fixture_embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    from storage import close, connect

    r = connect(None, tmp_path_factory.mktemp("embedded"))
    yield r
    close(r)


@pytest.fixture(name="r", params=["machine", "embedded"])
def fixture_r(request: pytest.FixtureRequest) -> redis.Redis:
    """Each test using it runs against the machine's Redis (db 13) and the embedded one."""
    return request.getfixturevalue(f"{request.param}_redis")


@pytest.fixture(name="prefix")
def fixture_prefix(r: redis.Redis) -> Iterator[str]:
    """A key prefix of the test's own on `r`; its keys are deleted afterwards."""
    from tests.test_storage_support import drop_prefix

    p = f"bsce-test-{uuid.uuid4().hex[:12]}"
    yield p
    drop_prefix(r, p)


@pytest.fixture(name="redis_process")
def fixture_redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own (AOF, fsync always), SIGKILLed at the end."""
    from tests.test_storage_support import REDIS_SERVER, RedisProcess

    if not Path(REDIS_SERVER).exists():
        pytest.fail("the fault tests start their own redis-server, which is not installed")
    rp = RedisProcess(tmp_path)
    rp.start()
    yield rp
    rp.kill()


# -- the server and load tests' Redis (database 12) ------------------------------------------


@pytest.fixture(name="server_redis", scope="session")
def fixture_server_redis() -> Iterator[redis.Redis]:
    from storage import close
    from tests.test_server_support import TEST_REDIS_URL
    from tests.test_storage_support import require_redis

    r = require_redis(TEST_REDIS_URL)
    yield r
    close(r)


@pytest.fixture(name="storage")
def fixture_storage(server_redis: redis.Redis, tmp_path: Path) -> Iterator[Storage]:
    """A ``Storage`` on database 12 under a prefix of its own, with a temporary model store
    (the server tests'; tests/test_storage_jobs.py has its own on ``r``)."""
    from storage import Storage
    from tests.test_storage_support import drop_prefix

    prefix = f"bsce-srvtest-{uuid.uuid4().hex[:12]}"
    yield Storage(server_redis, prefix, bentoml_home=tmp_path / "bentoml")
    drop_prefix(server_redis, prefix)
