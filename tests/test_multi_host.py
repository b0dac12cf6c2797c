"""Several hosts on one machine: two ``bentoml serve`` instances (ports of their own) and two
learner workers against one Redis prefix and one model-store directory, as two hosts would
share a Redis and a model store on shared storage (README, "Beyond one machine").

What must hold: every job is processed once (one version each, one attempt), in the order it
was posted whichever server took it, and both servers swap to each version.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import redis
import requests

from loadtest.stack import StackError, local_stack
from storage import Storage
from tests.test_server_support import (
    b64,
    class_images,
    drop_prefix,
    stack_env,
    wait_until,
)
from tests.test_storage_support import free_port

pytestmark = pytest.mark.integration

ADMIN = "admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
WORKER_ARGS = [
    "--gate", "off",
    "--fast-path", "off",  # one version per job: the test numbers them
    "--base-model", "none",
    "--min-steps", "0",
    "--backbone", "resnet8",
    "--epochs", "1",
    "--memory", "40",
    "--claim-timeout", "60",
    "--seed", "3",
]  # fmt: skip


@dataclass
class Hosts:
    urls: list[str]
    storage: Storage


@pytest.fixture(name="hosts", scope="module")
def fixture_hosts(
    server_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Hosts]:
    prefix = f"bsce-srvtest-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("hosts")
    home = tmp / "bentoml"  # the shared model store
    env = stack_env(prefix, home, ADMIN, 1, BSCE_MAX_LEARN_IMAGES="64")
    try:
        with ExitStack() as stacks:
            started = []
            for name in ("host-a", "host-b"):
                log_dir = tmp / name
                log_dir.mkdir()
                started.append(
                    stacks.enter_context(
                        local_stack(
                            env,
                            free_port(),
                            [*WORKER_ARGS, "--consumer", name],
                            log_dir=log_dir,
                        )
                    )
                )
            yield Hosts([s.url for s in started], Storage(server_redis, prefix, home))
    except StackError as e:
        pytest.fail(str(e))
    finally:
        drop_prefix(server_redis, prefix)


# Easy synthetic classes (one colour each): the test checks who learns what, not how well.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "grey": (128, 128, 128),
}


def _post(url: str, classes: list[str], per_class: int = 10) -> str:
    images, labels = [], []
    for i, name in enumerate(classes):
        images += [b64(im) for im in class_images(per_class, COLOURS[name], seed=i)]
        labels += [name] * per_class
    r = requests.post(
        url + "/learn", json={"images": images, "labels": labels}, headers=AUTH, timeout=60
    )
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _job(url: str, job_id: str) -> dict:
    r = requests.get(f"{url}/jobs/{job_id}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _served(url: str) -> int | None:
    return requests.get(url + "/health", timeout=30).json()["version"]


def test_jobs_posted_to_two_servers_run_once_in_order_and_both_swap(hosts: Hosts) -> None:
    a, b = hosts.urls
    # Alternate the servers; both workers compete for the queue.
    posted = [
        _post(a, ["red", "green"]),
        _post(b, ["blue"]),
        _post(a, ["yellow"]),
    ]
    for job_id in posted:
        wait_until(
            lambda job_id=job_id: _job(a, job_id)["state"] in ("done", "failed"),
            timeout_s=600,
            what=f"job {job_id} to finish",
        )
    jobs = [_job(b, job_id) for job_id in posted]  # either server reads the same store
    assert [j["state"] for j in jobs] == ["done"] * 3, jobs
    # Processed once: one attempt, one version each; in order: each built on the one before.
    assert [j["attempts"] for j in jobs] == [1, 1, 1]
    first = jobs[0]["version"]
    assert [j["version"] for j in jobs] == [first, first + 1, first + 2]
    assert [j["built_on"] for j in jobs[1:]] == [first, first + 1]
    assert [hosts.storage.versions.version_for_job(j) for j in posted] == [
        j["version"] for j in jobs
    ]
    versions = [v.version for v in hosts.storage.versions.list()]
    assert versions == sorted(set(versions)) and versions[-1] == first + 2, versions
    for url in (a, b):
        wait_until(lambda url=url: _served(url) == first + 2, 120, f"{url} to serve v{first + 2}")

    # Each version reaches both servers: one more job, then both answer with it.
    job_id = _post(b, ["grey"])
    wait_until(lambda: _job(b, job_id)["state"] == "done", 600, "the fourth job")
    version = _job(a, job_id)["version"]
    assert version == first + 3
    for url in (a, b):
        wait_until(lambda url=url: _served(url) == version, 120, f"{url} to serve v{version}")
        r = requests.post(
            url + "/predict",
            json={"images": [b64(class_images(1, COLOURS["grey"], seed=9)[0])]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version
        assert r.json()["num_classes"] == 5
