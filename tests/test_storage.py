"""Storage: connection, exemplar memory generations, label map, model versions, the error
boundary (real Redis only)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from storage import (
    ExemplarStore,
    ExemplarValidationError,
    JobQueue,
    LabelMap,
    LabelValidationError,
    MemoryGenerationError,
    MetadataError,
    NoPreviousVersionError,
    PinnedError,
    Storage,
    StorageError,
    StoreResponseError,
    StoreUnavailableError,
    UnknownLabelError,
    UnknownVersionError,
    VersionExistsError,
    VersionStore,
    close,
    connect,
    default_prefix,
    next_announcement,
)
from storage.connection import is_embedded
from tests.test_storage_support import TEST_REDIS_URL, RedisProcess, images, prefix_keys

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec"),
]

REPO = Path(__file__).resolve().parents[1]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "fc.bias": torch.randn(5, generator=g).to(torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


@pytest.fixture
def versions(
    r: redis.Redis, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> VersionStore:
    # The store follows BENTOML_HOME as the environment gives it.
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    return VersionStore(r, prefix)


# -- connection ---------------------------------------------------------------------------


def test_connect_url_and_env(monkeypatch: pytest.MonkeyPatch, machine_redis: redis.Redis) -> None:
    monkeypatch.setenv("REDIS_URL", TEST_REDIS_URL)
    r = connect()
    assert not is_embedded(r)
    key = f"bsce-test-conn-{os.getpid()}"
    try:
        r.set(key, b"\x00\xff")
        assert r.get(key) == b"\x00\xff"  # raw bytes, no decoding
    finally:
        r.delete(key)
        r.close()
    monkeypatch.setenv("BSCE_PREFIX", "deploy-a")
    assert default_prefix() == "deploy-a"
    monkeypatch.delenv("BSCE_PREFIX")
    assert default_prefix() == "bsce"


def test_embedded_keeps_state_across_restarts(tmp_path: Path) -> None:
    data_dir, home = tmp_path / "data", tmp_path / "bentoml"
    memory = {0: images(5, 1), 3: images(2, 2)}

    r = connect(None, data_dir)
    assert is_embedded(r)
    ExemplarStore(r, "p").write(1, memory)
    assert LabelMap(r, "p").get_or_add(["cat", "dog"]) == [0, 1]
    vs = VersionStore(r, "p", bentoml_home=home)
    vs.save(0, _tensors(0), {})
    vs.save(1, _tensors(1), {"parent_version": 0})
    vs.set_current(0)
    vs.set_current(1)

    def check(r: redis.Redis) -> None:
        back = ExemplarStore(r, "p").read(1)
        assert back.keys() == memory.keys()
        assert all(np.array_equal(back[k], memory[k]) for k in memory)
        assert ExemplarStore(r, "p").generations() == [1]
        assert LabelMap(r, "p").names() == ["cat", "dog"]
        vs = VersionStore(r, "p", bentoml_home=home)
        assert vs.current() == 1 and vs.pointer().history == [0]

    # A clean restart: the server saves and stops with its last client, and starts again.
    close(r)
    r = connect(None, data_dir)
    check(r)

    # A hard one: the server is killed; the append-only file has every acknowledged write.
    LabelMap(r, "p").get_or_add(["bird"])
    os.kill(r.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and r.pid:
        time.sleep(0.02)
    r2 = connect(None, data_dir)
    try:
        check_names = LabelMap(r2, "p").names()
        assert check_names == ["cat", "dog", "bird"]
        assert ExemplarStore(r2, "p").counts(1) == {0: 5, 3: 2}
        assert VersionStore(r2, "p", bentoml_home=home).current() == 1
    finally:
        close(r2)


# -- exemplar memory ----------------------------------------------------------------------


def test_exemplar_generations_write_read_delete(r: redis.Redis, prefix: str) -> None:
    ex = ExemplarStore(r, prefix)
    assert ex.generations() == [] and ex.counts(1) == {} and not ex.exists(1)
    with pytest.raises(MemoryGenerationError, match="no exemplar memory generation 1") as e:
        ex.read(1)
    assert isinstance(e.value, LookupError)

    first = {2: images(4, 1), 0: images(3, 2), 7: np.zeros((0, 3, 8, 8), np.uint8)}
    ex.write(1, first)
    back = ex.read(1)
    assert list(back) == [0, 2, 7]
    for k, a in first.items():
        assert back[k].dtype == np.uint8 and back[k].shape == a.shape and np.array_equal(back[k], a)
    back[0][0, 0, 0, 0] ^= 1  # results are the caller's own, writable copies
    assert np.array_equal(ex.read(1)[0], first[0])
    assert ex.counts(1) == {0: 3, 2: 4, 7: 0}
    info = ex.info(1)
    assert info.generation == 1 and info.counts == {0: 3, 2: 4, 7: 0}
    assert info.total_bytes == sum(a.nbytes for a in first.values())

    # Generations sit side by side; writing one again replaces it whole.
    second = {1: images(6, 3)}
    ex.write(2, second)
    assert ex.generations() == [1, 2] and list(ex.read(1)) == [0, 2, 7]
    ex.write(1, second)
    assert list(ex.read(1)) == [1] and ex.counts(1) == {1: 6}
    assert np.array_equal(ex.read_class(1, 1), second[1]) and ex.read_class(1, 0) is None

    # Memory-free setting: an empty memory is a valid generation, unlike a missing one.
    ex.write(3, {})
    assert ex.read(3) == {} and ex.info(3).total_bytes == 0 and ex.exists(3)
    ex.delete(1)
    assert ex.generations() == [2, 3] and ex.counts(1) == {}
    with pytest.raises(MemoryGenerationError):
        ex.info(1)


@pytest.mark.parametrize(
    "memory, generation, fragment",
    [
        ({0: images(2, 1).astype(np.float32)}, 1, "dtype uint8"),
        ({0: images(2, 1)[0]}, 1, "4 dimensions"),
        ({0: images(2, 1), 1: images(2, 2, chw=(3, 16, 16))}, 1, "(C, H, W) = (3, 8, 8)"),
        ({-1: images(2, 1)}, 1, "class index"),
        ({"a": images(2, 1)}, 1, "class index"),
        ({0: [[1, 2]]}, 1, "numpy array"),
        ({0: images(2, 1)}, -1, "generation"),
        ({0: images(2, 1)}, True, "generation"),
        ([images(2, 1)], 1, "mapping"),
    ],
)
def test_exemplars_bad_input_writes_nothing(
    r: redis.Redis, prefix: str, memory: object, generation: object, fragment: str
) -> None:
    ex = ExemplarStore(r, prefix)
    old = {5: images(3, 9)}
    ex.write(1, old)
    keys_before = prefix_keys(r, prefix)
    with pytest.raises(
        ExemplarValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")
    ) as e:
        ex.write(generation, memory)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    assert prefix_keys(r, prefix) == keys_before
    assert ex.generations() == [1] and np.array_equal(ex.read(1)[5], old[5])


# -- label map ----------------------------------------------------------------------------


def test_label_map(r: redis.Redis, prefix: str) -> None:
    labels = LabelMap(r, prefix)
    assert labels.get_or_add(["cat", "dog", "cat"]) == [0, 1, 0]
    assert labels.get_or_add(["bird", "dog"]) == [2, 1]  # a name posted again keeps its index
    assert labels.names() == ["cat", "dog", "bird"] and len(labels) == 3
    assert labels.index_of("bird") == 2 and labels.get("fish") is None
    assert labels.get_or_add(["chat noir 🐈"]) == [3]
    with pytest.raises(UnknownLabelError, match="fish") as e:
        labels.index_of("fish")
    assert isinstance(e.value, KeyError)


@pytest.mark.parametrize("bad", ["", " cat", "cat\n", "x" * 101, "a\x00b", 7, "tab\tname"])
def test_label_map_refuses_bad_names(r: redis.Redis, prefix: str, bad: object) -> None:
    labels = LabelMap(r, prefix)
    labels.get_or_add(["cat"])
    before = prefix_keys(r, prefix), labels.names()
    with pytest.raises(LabelValidationError):
        labels.get_or_add(["dog", bad])  # type: ignore[list-item]
    assert (prefix_keys(r, prefix), labels.names()) == before  # "dog" not added either


def test_label_map_concurrent_callers_agree(r: redis.Redis, prefix: str) -> None:
    names = [f"class-{i}" for i in range(40)]
    results: list[dict[str, int]] = []

    def worker(seed: int) -> None:
        order = list(np.random.default_rng(seed).permutation(names))
        out: dict[str, int] = {}
        for i in range(0, len(order), 5):
            chunk = order[i : i + 5]
            out.update(zip(chunk, LabelMap(r, prefix).get_or_add(chunk), strict=True))
        results.append(out)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(res == results[0] for res in results)  # same index for a name everywhere
    assert sorted(results[0].values()) == list(range(40))  # one name per index, no gaps
    final = LabelMap(r, prefix).names()
    assert {n: i for i, n in enumerate(final)} == results[0]


# -- model versions -----------------------------------------------------------------------


def test_version_save_load_list(versions: VersionStore, tmp_path: Path) -> None:
    import bentoml
    from bentoml._internal.tag import Tag

    assert Tag.from_taglike("bsce-classifier:3").version == "3"  # both forms are valid tags;
    assert Tag.from_taglike("bsce-classifier:v3").version == "v3"  # we use v3
    assert versions.next_version() == 0 and versions.list() == []

    t0, t1 = _tensors(0), _tensors(1)
    assert versions.save(0, t0, {"class_names": []}) == "bsce-classifier:v0"
    meta = {
        "class_names": ["cat", "dog"],
        "counts": np.array([500, 20]),  # numpy values are stored as their JSON values
        "parent_version": 0,
        "step": 1,
        "metrics": {"acc": 0.75, "forgetting": float("nan")},
        "job_id": "job-1",
        "learner_state": {"lambda": 0.5, "order": [3, 1]},
    }
    versions.save(1, t1, meta)
    assert versions.next_version() == 2 and versions.latest() == 1
    assert versions.version_for_job("job-1") == 1

    loaded, metadata = versions.load(1)
    assert loaded.keys() == t1.keys()
    for k in t1:
        assert loaded[k].dtype == t1[k].dtype and torch.equal(loaded[k], t1[k])
    assert metadata["learner_state"] == meta["learner_state"] and metadata["version"] == 1
    assert metadata["class_names"] == ["cat", "dog"] and metadata["parent_version"] == 0

    infos = versions.list()
    assert [i.version for i in infos] == [0, 1]
    assert infos[1].tag == "bsce-classifier:v1" and infos[1].counts == [500, 20]

    # It is a real BentoML model under $BENTOML_HOME/models, with the metadata shown.
    assert versions.model_store._path == tmp_path / "bentoml" / "models"
    model = bentoml.models.get("bsce-classifier:v1", _model_store=versions.model_store)
    assert model.info.metadata["class_names"] == ["cat", "dog"]
    assert model.info.metadata["parent_version"] == 0
    assert {p.name for p in Path(model.path).iterdir()} >= {
        "weights.safetensors",
        "state.json",
        "model.yaml",
    }


def test_version_save_refuses_bad_input(
    versions: VersionStore, r: redis.Redis, prefix: str
) -> None:
    versions.save(0, _tensors(0), {})
    before = (
        prefix_keys(r, prefix),
        sorted(p.name for p in (versions.model_store._path / "bsce-classifier").iterdir()),
    )

    def unchanged() -> bool:
        return before == (
            prefix_keys(r, prefix),
            sorted(p.name for p in (versions.model_store._path / "bsce-classifier").iterdir()),
        )

    with pytest.raises(VersionExistsError):
        versions.save(0, _tensors(5), {})
    assert unchanged() and torch.equal(versions.load(0)[0]["fc.bias"], _tensors(0)["fc.bias"])
    for tensors, meta in [
        ({}, {}),
        ({"w": np.zeros(3)}, {}),
        (_tensors(1), {"class_names": "cat"}),
        (_tensors(1), {"parent_version": "zero"}),
        (_tensors(1), {"learner_state": object()}),
    ]:
        with pytest.raises(MetadataError):
            versions.save(1, tensors, meta)  # type: ignore[arg-type]
        assert unchanged()
    with pytest.raises(MetadataError):
        versions.save(-1, _tensors(1), {})
    assert unchanged()


def test_unknown_version_changes_nothing(
    versions: VersionStore, r: redis.Redis, prefix: str
) -> None:
    versions.save(0, _tensors(0), {})
    versions.set_current(0)
    before = prefix_keys(r, prefix), versions.pointer()
    for call in (
        lambda: versions.load(9),
        lambda: versions.info(9),
        lambda: versions.set_current(9),
        lambda: versions.pin(9),
    ):
        with pytest.raises(UnknownVersionError, match="no model version 9") as e:
            call()
        assert isinstance(e.value, KeyError)
    assert (prefix_keys(r, prefix), versions.pointer()) == before


def test_pointer_announcements_rollback_and_pin(versions: VersionStore) -> None:
    for v in range(4):
        versions.save(v, _tensors(v), {"parent_version": v - 1 if v else None})
    sub = versions.subscribe()
    try:
        assert versions.current() is None
        for v in (0, 1, 2):
            assert versions.set_current(v, reason=f"to {v}") is True
            a = next_announcement(sub, 2.0)
            assert a is not None and (a.event, a.version, a.reason) == ("set", v, f"to {v}")
            assert a.previous == (v - 1 if v else None) and a.tag == f"bsce-classifier:v{v}"

        assert versions.rollback() == 1
        a = next_announcement(sub, 2.0)
        assert a is not None and (a.event, a.version, a.previous) == ("rollback", 1, 2)
        assert versions.rollback() == 0 and versions.current() == 0
        next_announcement(sub, 2.0)
        with pytest.raises(NoPreviousVersionError):
            versions.rollback()
        assert versions.current() == 0

        # Pinned: the learner's moves are skipped, a rollback is refused.
        versions.pin(1)
        a = next_announcement(sub, 2.0)
        assert a is not None and (a.event, a.version, a.pinned) == ("pin", 1, 1)
        assert versions.set_current(3, "learner") is False
        assert versions.current() == 1 and versions.pinned() == 1
        with pytest.raises(PinnedError):
            versions.rollback()
        assert next_announcement(sub, 0.2) is None  # nothing changed, nothing announced

        assert versions.unpin() == 3  # to the newest, where it would be without the pin
        a = next_announcement(sub, 2.0)
        assert a is not None and (a.event, a.version, a.previous, a.pinned) == ("unpin", 3, 1, None)
        assert versions.pinned() is None
        assert versions.rollback() == 1  # back to what was served before
    finally:
        sub.close()


def test_ensure_initial_once_under_race(versions: VersionStore) -> None:
    calls: list[int] = []

    def factory() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        calls.append(1)
        time.sleep(0.3)  # widen the race window
        return _tensors(0), {"class_names": []}

    errors: list[BaseException] = []

    def start() -> None:
        try:
            assert versions.ensure_initial(factory) == 0
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(calls) == 1
    assert [i.version for i in versions.list()] == [0] and versions.current() == 0
    assert versions.memory(0) == {}  # an empty generation by default
    assert versions.ensure_initial(factory) == 0 and len(calls) == 1


def test_version_memory_generation(versions: VersionStore, r: redis.Redis, prefix: str) -> None:
    memory = {0: images(2, 1), 1: images(3, 2)}
    versions.save(0, _tensors(0), {}, memory=memory)
    info = versions.info(0)
    assert info.memory_generation == 0 and versions.metadata(0)["memory_generation"] == 0
    back = versions.memory(0)
    assert list(back) == [0, 1] and all(np.array_equal(back[c], memory[c]) for c in memory)
    assert versions.memory_info(0).counts == {0: 2, 1: 3}  # type: ignore[union-attr]
    # The version's files hold the weights only: the memory lives in Redis.
    assert versions.load(0)[0].keys() == _tensors(0).keys()

    versions.save(1, _tensors(1), {"parent_version": 0})  # no memory: none to build on
    assert versions.info(1).memory_generation is None and versions.memory_info(1) is None
    with pytest.raises(MemoryGenerationError, match="saved without an exemplar memory"):
        versions.memory(1)

    # The store owns memory_generation: one copied from elsewhere is not taken over.
    versions.save(2, _tensors(2), {"memory_generation": 0, "parent_version": 0})
    assert versions.info(2).memory_generation is None
    assert "memory_generation" not in versions.metadata(2)

    before = (
        prefix_keys(r, prefix),
        sorted(p.name for p in (versions.model_store._path / "bsce-classifier").iterdir()),
    )
    with pytest.raises(ExemplarValidationError):  # checked before any file is written
        versions.save(3, _tensors(3), {}, memory={0: images(2, 1).astype(np.float32)})
    assert before == (
        prefix_keys(r, prefix),
        sorted(p.name for p in (versions.model_store._path / "bsce-classifier").iterdir()),
    )


def test_ensure_initial_takes_a_memory_from_the_factory(versions: VersionStore) -> None:
    memory = {3: images(4, 5)}
    with pytest.raises(MetadataError, match="factory must return"):
        versions.ensure_initial(lambda: (_tensors(0),))  # type: ignore[arg-type,return-value]
    assert not versions.exists(0)
    assert versions.ensure_initial(lambda: (_tensors(0), {"class_names": []}, memory)) == 0
    assert versions.info(0).memory_generation == 0
    assert np.array_equal(versions.memory(0)[3], memory[3])
    assert versions.exemplars.generations() == [0]


def test_crashed_save_leftover_is_replaced(versions: VersionStore) -> None:
    versions.save(0, _tensors(0), {})
    # A writer that died after writing files but before registering them.
    pending = versions.write(1, _tensors(7), {})
    versions.release_lock(pending)
    assert not versions.exists(1) and versions.next_version() == 1
    with pytest.raises(UnknownVersionError):
        versions.load(1)
    versions.save(1, _tensors(1), {})
    assert torch.equal(versions.load(1)[0]["conv.weight"], _tensors(1)["conv.weight"])
    assert len(versions.model_store.list("bsce-classifier")) == 2


def test_corrupt_weights_are_detected(versions: VersionStore) -> None:
    versions.save(0, _tensors(0), {})
    weights = versions.model_dir(0) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="digest"):
        versions.load(0)


_SHARER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("conn", sys.argv[1])
conn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conn)  # just the connection module: no torch import, fast
r = conn.connect(None, conn.Path(sys.argv[2]))
r.incr("p:starts")
print(r.pid, flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_embedded_server_is_shared_by_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    import psutil

    module = Path(__file__).resolve().parents[1] / "storage" / "connection.py"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARER, str(module), str(tmp_path), str(0.3 + 0.2 * i)],
            stdout=subprocess.PIPE,
        )
        for i in range(3)
    ]
    pids = {int(p.communicate(timeout=60)[0]) for p in procs}
    assert len(pids) == 1  # started at once, one server
    (pid,) = pids
    # The last process to exit stopped it, after saving.
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    r = connect(None, tmp_path)
    try:
        assert r.get("p:starts") == b"3" and r.pid != pid
    finally:
        close(r)


# -- the storage boundary -----------------------------------------------------------------


def test_a_store_that_is_down_raises_storage_errors(
    redis_process: RedisProcess, tmp_path: Path
) -> None:
    st = Storage(connect(redis_process.url), "p", bentoml_home=tmp_path / "bentoml")
    st.versions.ensure_initial(lambda: (_tensors(0), {}))
    sub = st.versions.subscribe()
    redis_process.kill()
    calls = {
        "current": st.versions.current,
        "pointer": st.versions.pointer,
        "rollback": st.versions.rollback,
        "memory": lambda: st.versions.memory(0),
        "names": st.labels.names,
        "submit": lambda: st.jobs.submit(images(1, 1), ["a"]),
        "claim": lambda: st.jobs.claim("w"),
        "status": lambda: st.jobs.status("x"),
        "generations": st.exemplars.generations,
        "announcement": lambda: next_announcement(sub, 1.0),
        "subscribe": st.versions.subscribe,
        "open": lambda: Storage(connect(redis_process.url), "p", bentoml_home=tmp_path),
    }
    for what, call in calls.items():
        with pytest.raises(StoreUnavailableError, match="unreachable") as e:
            call()
        assert isinstance(e.value, StorageError), what
    sub.close()


def test_a_refused_command_is_a_storage_error(r: redis.Redis, prefix: str) -> None:
    labels = LabelMap(r, prefix)
    r.set(labels.keys.labels_names, b"not a list")  # WRONGTYPE for every list command
    with pytest.raises(StoreResponseError, match="WRONGTYPE"):
        labels.names()
    with pytest.raises(StoreResponseError):
        JobQueue(r, prefix).submit(images(1, 1), ["a"])


def test_no_module_outside_storage_imports_redis() -> None:
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("server", "learner", "loadtest", "scripts")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip().startswith(("import redis", "from redis"))
    ]
    assert found == []
