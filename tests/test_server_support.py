"""Helpers shared by the server and load tests (tests/test_server*.py,
tests/test_loadtest.py); no tests here. Their fixtures (``server_redis``, ``storage``) are in
tests/conftest.py.

The server tests use the machine's Redis, database 12 (``BSCE_TEST_SERVER_REDIS_URL``),
each under its own key prefix whose keys are deleted afterwards; never the whole database.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch
from PIL import Image

from learner.core.config import ModelConfig, StepConfig
from learner.core.model import IncrementalNet
from learner.core.versioning import initial_payload, version_payload
from loadtest.stack import REPO, stop_process
from storage import Storage
from tests.test_storage_support import drop_prefix as drop_prefix  # the server tests' import

TEST_REDIS_URL = os.environ.get("BSCE_TEST_SERVER_REDIS_URL", "redis://127.0.0.1:6379/12")
SMALL = StepConfig(model=ModelConfig(backbone="resnet8"))


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """(H, W, C) or (H, W) uint8 -> image file bytes."""
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def random_image(
    seed: int, w: int = 32, h: int = 32, fmt: str = "PNG", mode: str | None = None
) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), fmt, mode)


def class_images(n: int, colour: Sequence[int], seed: int) -> list[bytes]:
    """Noisy images around one colour: an easy class for a few training steps."""
    rng = np.random.default_rng(seed)
    base = np.asarray(colour, dtype=np.int16)
    out = []
    for _ in range(n):
        noise = rng.integers(-30, 31, size=(32, 32, 3))
        out.append(encode(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def save_version(
    storage: Storage,
    version: int,
    class_names: Sequence[str],
    active: Sequence[bool] | None = None,
    serve: bool = True,
    parent: int | None = -1,
    gate: dict[str, Any] | None = None,
) -> None:
    """A resnet8 version with random weights (what the learner's commit would write);
    its parent is `parent`, by default the version before; `gate`, its gate report."""
    if version == 0 and not class_names:
        tensors, metadata = initial_payload(SMALL, seed=0)
    else:
        net = IncrementalNet.create(
            SMALL.model, torch.Generator().manual_seed(version), num_classes=len(class_names)
        )
        tensors, metadata = version_payload(
            net,
            class_names=list(class_names),
            counts=[5] * len(class_names),
            augment=SMALL.augment,
            config=SMALL,
            extra={
                "parent_version": version - 1 if parent == -1 else parent,
                "active_classes": list(active) if active is not None else [True] * len(class_names),
                **({} if gate is None else {"gate": gate}),
            },
        )
    storage.versions.save(version, tensors, metadata)
    if serve:
        storage.versions.set_current(version)


def stack_env(
    prefix: str, bentoml_home: Path, token: str, workers: int, **settings: str
) -> dict[str, str]:
    """Environment for a test stack on the test Redis under its own prefix; ``settings`` are
    extra ``BSCE_*`` variables. One thread per process keeps 2 cores from oversubscribing."""
    env = {
        **os.environ,
        "REDIS_URL": TEST_REDIS_URL,
        "BSCE_PREFIX": prefix,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "BSCE_API_TOKEN": token,
        "BSCE_WORKERS": str(workers),
        "BSCE_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **settings,
    }
    env.pop("BSCE_PREDICT_TOKEN", None)
    return env


def weights_file(storage: Storage, version: int) -> Path:
    return storage.versions.model_dir(version) / "weights.safetensors"


def truncate_weights(storage: Storage, version: int) -> bytes:
    """Cut `version`'s weights file in half (a disk that lost its tail); the original."""
    path = weights_file(storage, version)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return original


@contextmanager
def serve_only(env: Mapping[str, str], port: int, log: Path, timeout_s: float = 240.0):
    """``bentoml serve`` alone (no learner worker) on `port`; yields its URL once /readyz
    answers 200, stops its process group at the end."""
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "server.service:BsceServe",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _ready(url, proc, log), timeout_s, f"the server at {url} ready")
            yield url
        finally:
            stop_process(proc)


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"bentoml serve exited: {log.read_text(errors='replace')[-3000:]}")
    try:
        return requests.get(url + "/readyz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    """Poll `condition` until it returns something true (its value); fail after `timeout_s`
    (generous: the deadline only bounds a hang, it is never what a test checks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
