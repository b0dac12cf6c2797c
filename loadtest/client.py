"""A small HTTP client for the bsce-serve API (server/README.md), shared by the replay and the
load-test scripts. Nothing here touches Redis or the model store."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image


class ServerError(RuntimeError):
    """The server refused or failed a request; the message carries its status and error."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        try:
            error = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            error = body
        super().__init__(f"{method} {path}: {status} {str(error)[:500]}")
        self.status = status
        self.error = str(error)


def png_bytes(chw: np.ndarray) -> bytes:
    """A uint8 (C, H, W) array as a PNG file (lossless: the server decodes the same pixels)."""
    array = np.ascontiguousarray(np.asarray(chw, dtype=np.uint8))
    img = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_b64(chw: np.ndarray) -> str:
    return base64.b64encode(png_bytes(chw)).decode("ascii")


def encode_images(images: Any) -> list[str]:
    """(N, C, H, W) uint8 (numpy or torch) -> base64 PNG strings."""
    array = np.asarray(images)
    return [png_b64(array[i]) for i in range(array.shape[0])]


def parse_time(value: Any) -> float | None:
    """An ISO timestamp from a job status as epoch seconds (None stays None)."""
    if value in (None, ""):
        return None
    from datetime import datetime

    return datetime.fromisoformat(str(value)).timestamp()


class Client:
    """bsce-serve over HTTP: one ``requests.Session`` (keep-alive), bearer token if given."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return self.session.request(method, self.url + path, **kwargs)

    def get_json(self, path: str) -> Any:
        r = self.request("GET", path)
        if r.status_code != 200:
            raise ServerError("GET", path, r.status_code, r.text)
        return r.json()

    def post_json(self, path: str, body: Any, expect: int = 200) -> Any:
        data = json.dumps(body, separators=(",", ":")).encode()
        r = self.request("POST", path, data=data, headers={"Content-Type": "application/json"})
        if r.status_code != expect:
            raise ServerError("POST", path, r.status_code, r.text)
        return r.json()

    # -- endpoints -------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll /health until the server answers ready; its health record."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                r = self.request("GET", "/health", timeout=10)
                if r.status_code == 200 and r.json().get("ready"):
                    return r.json()
                last = r.text[:300]
            except requests.RequestException as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} not ready after {timeout_s:.0f} s: {last}")

    def predict(self, images_b64: Sequence[str], top_k: int = 5) -> dict[str, Any]:
        return self.post_json("/predict", {"images": list(images_b64), "top_k": top_k})

    def learn(
        self,
        images_b64: Sequence[str],
        labels: Sequence[str],
        overrides: dict[str, Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> tuple[dict[str, Any], int]:
        """Queue one job; (JobAccepted, request body bytes). ``classes``: the order in which
        new classes get their index (default: first appearance in ``labels``)."""
        body: dict[str, Any] = {"images": list(images_b64), "labels": list(labels)}
        if classes is not None:
            body["classes"] = list(classes)
        if overrides:
            body["overrides"] = overrides
        data = json.dumps(body, separators=(",", ":")).encode()
        r = self.request("POST", "/learn", data=data, headers={"Content-Type": "application/json"})
        if r.status_code != 202:
            raise ServerError("POST", "/learn", r.status_code, r.text)
        return r.json(), len(data)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get_json(f"/jobs/{job_id}")

    def wait_job(
        self, job_id: str, timeout_s: float = 7200.0, poll_s: float = 0.25
    ) -> dict[str, Any]:
        """Poll the job until it ends: done, or rejected by the promotion gate (its version is
        saved, not served: see ``status["gate"]``); raises on failed or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.job(job_id)
            if status["state"] in ("done", "rejected"):
                return status
            if status["state"] == "failed":
                raise RuntimeError(f"job {job_id} failed: {status.get('error')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout_s:.0f} s: {status}")
            time.sleep(poll_s)

    def versions(self) -> dict[str, Any]:
        return self.get_json("/versions")

    def version_info(self, version: int) -> dict[str, Any]:
        for info in self.versions()["versions"]:
            if info["version"] == version:
                return info
        raise KeyError(f"the server lists no version {version}")

    def classes(self) -> dict[str, Any]:
        return self.get_json("/classes")

    def served_versions(self) -> dict[int, int]:
        """{pid: version} of the live API worker processes, from /metrics (-1: none loaded
        yet). A worker still starting is missing."""
        try:
            r = self.request("GET", "/metrics", timeout=30)
        except requests.RequestException:
            return {}
        if r.status_code != 200:
            return {}
        found = re.findall(r'^bsce_served_version\{[^}]*pid="(\d+)"[^}]*\}\s+(\S+)', r.text, re.M)
        return {int(pid): int(float(v)) for pid, v in found}

    def server_workers(self) -> int | None:
        """Live API worker processes (see `served_versions`)."""
        return len(self.served_versions()) or None


def version_metadata(
    client: Client, info: dict[str, Any], bentoml_home: Path | None, version: int
) -> tuple[dict[str, Any] | None, str]:
    """The learner's metadata of `version` (config, seed, rng, report, machine) and where it
    came from: GET /versions/{version} ("api"); from a server without that route, the
    version's ``state.json`` in the server's model store when its BENTOML_HOME is given
    ("model-store"); else (None, "unavailable").
    """
    try:
        detail = client.get_json(f"/versions/{int(version)}")
    except ServerError as e:
        if e.status != 404:
            raise
        detail = None
    if detail is not None and isinstance(detail.get("config"), dict):
        return {**detail["info"], **{k: v for k, v in detail.items() if k != "info"}}, "api"
    if bentoml_home is not None:
        tag = str(info.get("tag") or f"bsce-classifier:v{version}")
        name, _, ver = tag.partition(":")
        path = Path(bentoml_home) / "models" / name / ver / "state.json"
        if path.is_file():
            return json.loads(path.read_text()), "model-store"
    return None, "unavailable"
