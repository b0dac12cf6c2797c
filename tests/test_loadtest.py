"""The replay client and the Locust scenarios against a real server.

One ``bentoml serve`` (2 API workers) and one learner worker (resnet8, memory 40, seed 7)
start for the module, on the machine's Redis (database 12, a prefix of our own, deleted at
the end) and a temporary BentoML home; both process groups are killed at the end. The
replay runs first (it needs a fresh store), then the Locust smoke run; both are marked
``integration``. Tests without the server: the replay's data selection, the random stream
versions carry, the Locust command, and the swap-window analysis on synthetic records.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

import learner.bench as bench
from learner.core.config import ModelConfig, StepConfig
from learner.core.gate import GateConfig
from learner.core.model import IncrementalNet
from learner.core.versioning import initial_payload, step_generator
from learner.data import load_dataset
from learner.protocols import get_protocol, resolve_class_order
from loadtest import replay
from loadtest.client import Client
from loadtest.run import LocustRun, run_locust, summarise, version_changes
from loadtest.stack import Stack, StackError, local_stack
from loadtest.swap_under_load import analyse, swap_counter_deltas
from tests.test_server_support import drop_prefix, stack_env
from tests.test_storage_support import free_port

REPO = Path(__file__).resolve().parents[1]
TOKEN = "loadtest-admin-token"
WORKERS = 2
SEED = 7
MEMORY = 40
PROTOCOL = "cifar10-subset-b0-s5"


class LoadTestServer:
    def __init__(self, stack: Stack, home: Path) -> None:
        self.url, self.home, self.stack = stack.url, home, stack

    def log_tail(self) -> str:
        return self.stack.log_tail(3000)


@pytest.fixture(name="lt_server", scope="module")
def fixture_lt_server(
    server_redis: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoadTestServer]:
    prefix = f"bsce-lttest-{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("loadtest-server")
    home = tmp / "bentoml"
    port = free_port()
    # BSCE_MAX_BATCH smaller than the replay's first chunk: exercises its 413 -> smaller
    # chunks path.
    env = stack_env(prefix, home, TOKEN, WORKERS, BSCE_MAX_BATCH="32")
    worker_args = [
        "--base-model", "none", "--min-steps", "0", "--backbone", "resnet8", "--epochs", "1",
        "--memory", str(MEMORY), "--seed", str(SEED),
        "--claim-timeout", "60",
    ]  # fmt: skip
    try:
        with local_stack(env, port, worker_args, log_dir=tmp) as stack:
            server = LoadTestServer(stack, home)
            # Ready answers may all come from one worker: wait until every worker serves v0.
            deadline = time.monotonic() + 180
            with Client(server.url) as client:
                while len([v for v in client.served_versions().values() if v >= 0]) < WORKERS:
                    if time.monotonic() > deadline:
                        pytest.fail(f"not every worker loaded a version\n{server.log_tail()}")
                    time.sleep(0.2)
            yield server
    except StackError as e:
        pytest.fail(str(e))
    finally:
        drop_prefix(server_redis, prefix)


# -- offline reference -------------------------------------------------------------------------


def offline_reference(result: dict[str, Any]) -> dict[str, Any]:
    """``learner.bench.run_protocol`` on the replay's protocol, config, seed and data, with
    the thread count the learner worker used (it changes float rounding in training) and the
    worker's promotion gate (its defaults: the stack runs with the gate on)."""
    protocol = get_protocol(PROTOCOL)
    dataset = load_dataset(protocol.dataset)
    order = resolve_class_order(protocol, dataset.train.class_names)
    short, short_order = replay.truncated_protocol(
        protocol, order, result["protocol_config"]["num_steps"]
    )
    config = StepConfig.model_validate(result["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(result["machine"]["torch_threads"]))
    try:
        return bench.run_protocol(
            short, config, dataset, short_order, seed=result["seed"],
            device=torch.device("cpu"), max_train_per_class=result["max_train_per_class"],
            progress=False, gate=GateConfig(),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


# -- tests with the server ---------------------------------------------------------------------


@pytest.mark.integration
def test_replay_agrees_with_offline_runner(lt_server: LoadTestServer, tmp_path: Path) -> None:
    result = replay.main(
        [
            "--protocol", PROTOCOL, "--url", lt_server.url, "--token", TOKEN, "--steps", "2",
            "--epochs", "2", "--memory", str(MEMORY),
            "--seed", str(SEED), "--backbone", "resnet8", "--predict-batch", "256",
            "--bentoml-home", str(lt_server.home), "--out", str(tmp_path), "--plot",
        ]
    )  # fmt: skip
    written = json.loads((tmp_path / replay.replay_filename(result)).read_text())
    assert written["metrics"] == result["metrics"]
    assert (tmp_path / replay.replay_filename(result)).with_suffix(".png").is_file()

    # The offline runner's keys, and what only HTTP can say.
    offline = offline_reference(result)
    assert set(offline) - {"nme"} <= set(result)
    assert result["source"] == "http" and result["url"] == lt_server.url
    # The stack runs the fast path (the worker's default): step 1 builds on the untrained
    # version 0 (no interim), step 2 makes its interim (2) before its full version (3).
    assert result["versions"] == [1, 3] and result["server"]["workers"] == WORKERS
    assert result["config_source"] == "api"
    assert result["config"]["model"]["backbone"] == "resnet8"
    assert result["config"]["optim"]["epochs"] == 2  # the per-job override was applied
    assert result["memory"] == {"mode": "fixed_total", "size": MEMORY, "selection": "herding"}
    # Each step continued its parent's random stream, as run_protocol's one generator does.
    assert result["seed"] == SEED and result["step_rng"] == ["parent", "parent"]
    for step in result["steps"]:
        h = step["http"]
        # 200 posted; the gate held 10 of each class's 100 out of training.
        assert h["learn_latency_seconds"] > 0 and h["train_images"] == 200
        assert sum(step["counts"][-2:]) == 180
        assert h["predict_batch"] == 32  # halved from 256 on the server's 413s
    assert result["class_names"] == offline["class_names"]
    assert result["config"] == offline["config"]

    print(
        f"\nhttp    {result['metrics']} {result['accuracy_matrix']}"
        f"\noffline {offline['metrics']} {offline['accuracy_matrix']}"
    )
    # Same recipe, data in the same order, one random stream, same threads: the learner
    # worker's training is run_protocol's, loss for loss.
    for mine, theirs in zip(result["steps"], offline["steps"], strict=True):
        assert mine["counts"] == theirs["counts"]
        assert mine["loss_per_epoch"] == theirs["loss_per_epoch"]
        # The same held-out images, the same verdict.
        assert mine["gate"]["verdict"] == theirs["gate"]["verdict"]
        assert mine["gate"]["heldout_images"] == theirs["gate"]["heldout_images"]
    for key in ("avg_incremental_accuracy", "last_accuracy", "forgetting"):
        assert abs(result["metrics"][key] - offline["metrics"][key]) <= 1.0, key
    comparison = replay.compare(result, offline)
    assert comparison["within_one_point"] and comparison["machine_fields_differing"] == []
    assert comparison["config_fields_differing"] == []

    # The same comparison from the files, as `python -m loadtest.compare` makes it.
    offline_file = tmp_path / "offline.json"
    offline_file.write_text(json.dumps(offline))
    replay_file = tmp_path / replay.replay_filename(result)
    updated = replay.compare_main([str(replay_file), str(offline_file)])
    (again,) = updated["comparisons"]
    assert (
        again["offline_file"] == str(offline_file)
        and again["difference"] == comparison["difference"]
    )
    assert json.loads(replay_file.read_text())["comparison"] == again


@pytest.mark.integration
def test_locust_headless_smoke(lt_server: LoadTestServer, tmp_path: Path) -> None:
    summary = run_locust(
        lt_server.url, users=3, spawn_rate=3, duration_s=8, out=tmp_path,
        updates=1, token=TOKEN, batch_size=8, update_images=10,
        first_update_after_s=1.0, stop_timeout_s=10,
    )  # fmt: skip
    assert summary["requests"] > 0 and summary["failures"] == 0, summary["failure_examples"]
    assert summary["all_failures"] == 0, summary["failure_examples"]
    for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "versions_seen", "swaps", "users", "date"):
        assert summary[key] is not None, key
    assert summary["workers"] == WORKERS and summary["users"] == 3
    # The update was learnt and served, or rejected by the promotion gate and never served.
    updater = summary["updater"]
    assert updater["landed"] + updater["rejected"] == 1
    assert not set(updater["rejected_versions"]) & set(summary["versions_seen"])
    if updater["landed"]:
        new = updater["versions"][0]
        assert new in summary["versions_seen"] and summary["swaps"] >= 1
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["requests"] == summary["requests"]


# -- tests without the server ------------------------------------------------------------------


def test_step_indices_are_the_offline_runners() -> None:
    # Interleaved labels, as in CIFAR's own batches: dataset order is kept (the server's
    # label map takes the learning order from the request's classes, not from the samples).
    y = torch.tensor([3, 1, 0, 1, 0, 2, 1, 0])
    assert replay.step_indices(y, 0, 2, None).tolist() == [1, 2, 3, 4, 6, 7]
    assert (
        replay.step_indices(y, 0, 2, 2).tolist()
        == bench.limit_per_class(torch.tensor([1, 2, 3, 4, 6, 7]), y, 2).tolist()
    )


def test_versions_carry_the_offline_runners_random_stream() -> None:
    """Version 0 holds run_protocol's generator right after the model was drawn, and a step
    on top of a version continues from that version's saved stream (learner.worker)."""
    config, seed = StepConfig(model=ModelConfig(backbone="resnet8")), SEED
    tensors, metadata = initial_payload(config, seed)
    gen = torch.Generator().manual_seed(seed)
    offline_model = IncrementalNet.create(config.model, gen)
    for k, v in offline_model.to_tensors().items():
        assert torch.equal(tensors["model." + k], v), k
    assert metadata["seed"] == seed and metadata["rng"] == "seed"
    resumed = step_generator(tensors, fallback_seed=seed + 1)
    assert torch.equal(resumed.get_state(), gen.get_state())
    assert torch.equal(torch.randperm(100, generator=resumed), torch.randperm(100, generator=gen))
    # A version without a saved stream (written before streams were saved) gets seed + v.
    legacy = step_generator({}, fallback_seed=seed + 1)
    assert torch.equal(legacy.get_state(), torch.Generator().manual_seed(seed + 1).get_state())


def test_locust_user_classes_and_command(tmp_path: Path) -> None:
    run = LocustRun("http://h:1", users=3, spawn_rate=2.0, duration_s=7.6, out=tmp_path)
    assert run.user_classes() == ["SinglePredictUser", "BatchPredictUser"]
    cmd = run.command(run.user_classes())
    assert cmd[cmd.index("-t") + 1] == "8s" and cmd[cmd.index("--host") + 1] == "http://h:1"
    assert cmd[cmd.index("--bsce-records") + 1] == str(tmp_path / "requests.jsonl")
    assert cmd[cmd.index("--bsce-stop-after") + 1] == "-1" and "--bsce-token" not in cmd
    assert cmd[-2:] == ["SinglePredictUser", "BatchPredictUser"]
    updater = LocustRun(
        "http://h:1", 2, 1.0, 5.0, tmp_path, updates=1, token="T", single=False, extra_args=["-x"]
    )
    cmd = updater.command(updater.user_classes())
    assert cmd[-3:] == ["-x", "BatchPredictUser", "UpdaterUser"]
    assert cmd[cmd.index("--bsce-token") + 1] == "T"
    with pytest.raises(ValueError, match="no user class"):
        LocustRun("u", 2, 1.0, 5.0, tmp_path, single=False, batched=False).user_classes()
    with pytest.raises(ValueError, match="at least 2"):
        LocustRun("u", 1, 1.0, 5.0, tmp_path, updates=1).user_classes()


def test_swap_counter_deltas() -> None:
    before = {"bsce_swap_duration_seconds_sum": 0.5, "bsce_swap_duration_seconds_count": 1.0}
    after = {
        "bsce_swap_duration_seconds_sum": 1.7,
        "bsce_swap_duration_seconds_count": 3.0,
        "bsce_swap_failures_total": 0.0,
    }
    deltas = swap_counter_deltas(before, after)
    assert deltas["bsce_swap_duration_seconds_count"] == 2.0
    assert deltas["mean_load_seconds"] == pytest.approx(0.6)
    assert deltas["bsce_swap_failures_total"] is None  # not counted before: unknown
    assert swap_counter_deltas({}, {}) == {}


def _records(path: Path) -> Path:
    rows = []
    # Version 0 until the commit at t=10, a stale worker answers v0 once at t=10.4, then v1.
    for i in range(200):
        t = 1000.0 + i * 0.1
        version = 0 if t < 10 + 1000.0 else 1
        if abs(t - 1010.4) < 1e-6:
            version = 0
        rows.append({"t": t, "ms": 50.0 if version == 0 else 20.0, "name": "POST /predict [1 image]",
                     "ok": True, "version": version, "pid": 1 + i % 2, "error": None})  # fmt: skip
    rows.append({"t": 1005.0, "ms": 10.0, "name": "GET /jobs/[id]", "ok": False, "version": None,
                 "pid": None, "error": "HTTP 503"})  # fmt: skip
    job = {"state": "done", "version": 1, "class": "x", "started": "1970-01-01T00:16:48+00:00",
           "finished": "1970-01-01T00:16:50+00:00"}  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" + json.dumps({"job": job}) + "\n")
    return path


def test_summary_and_swap_windows_from_records(tmp_path: Path) -> None:
    records = _records(tmp_path / "requests.jsonl")
    s = summarise(records, tmp_path / "missing.csv", {"users": 2})
    assert s["requests"] == 200 and s["failures"] == 0 and s["all_failures"] == 1
    assert s["versions_seen"] == [0, 1] and s["swaps"] == 1 and s["version_flips"] == 3
    a = analyse(records, window_s=1.0)
    (swap,) = a["swaps"]
    assert swap["commit"] == pytest.approx(1010.0)
    assert swap["last_stale_start_after_commit_s"] == pytest.approx(0.4)
    assert swap["window"] == pytest.approx([1010.0, 1011.4])
    lat = a["latency"]
    assert lat["during_swaps"]["requests"] + lat["outside_swaps"]["requests"] == 200
    assert lat["training"]["requests"] > 0 and lat["quiet"]["requests"] > 0
    assert version_changes([{"t": 0, "ms": 1, "ok": True, "version": 2}]) == ([2], 0, 0)
