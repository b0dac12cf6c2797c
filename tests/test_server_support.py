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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from learner.core.config import ModelConfig, StepConfig
from learner.core.model import IncrementalNet
from learner.core.versioning import initial_payload, version_payload
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
) -> None:
    """A resnet8 version with random weights (what the learner's commit would write)."""
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
                "parent_version": version - 1,
                "active_classes": list(active) if active is not None else [True] * len(class_names),
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
