"""In-process tests of the server's fast paths: image validation, settings, the gateway
middleware, the swap holder and the version watcher, adaptive batching."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

from server.batching import Overloaded, SingleImageBatcher
from server.holder import Degraded, ModelHolder, ServedVersion, VersionWatcher, load_served
from server.images import ImageInputError, b64decode, decode_batch, decode_for_model
from server.metrics import Metrics, forget_dead_workers, store_metrics_text
from server.middleware import JSON, MULTIPART, Gateway, Route
from server.schemas import LearnRequest, PredictRequest
from server.settings import Settings
from storage import Storage
from tests.test_server_support import (
    b64,
    encode,
    random_image,
    save_version,
    truncate_weights,
    wait_until,
    weights_file,
)

# BentoML's IO descriptors trip a pydantic deprecation when server.service is imported.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211")

CHW = (3, 32, 32)
LIMIT = 256 * 256


def decode(data: bytes, chw: tuple[int, int, int] = CHW, exact: bool = False) -> np.ndarray:
    return decode_for_model(data, chw, what="image 0", max_pixels=LIMIT, exact_size=exact)


# -- images -------------------------------------------------------------------------------


def test_b64decode_accepts_plain_and_data_urls_and_refuses_garbage() -> None:
    raw = random_image(0)
    assert b64decode(b64(raw), "image 0") == raw
    assert b64decode("data:image/png;base64," + b64(raw), "image 0") == raw
    for bad, why in [("", "empty"), ("abc", "not valid base64"), ("@@@@", "not valid base64")]:
        with pytest.raises(ImageInputError, match=why):
            b64decode(bad, "image 0")


def test_decode_keeps_exact_pixels_of_a_model_sized_png() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = decode(encode(pixels))
    assert out.dtype == np.uint8 and out.shape == CHW
    assert np.array_equal(out, pixels.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])
def test_convertible_modes_become_the_models_channels(mode: str) -> None:
    data = random_image(2, mode=mode)
    assert decode(data).shape == CHW
    assert decode(data, (1, 32, 32)).shape == (1, 32, 32)


def test_grayscale_is_replicated_into_rgb() -> None:
    gray = np.random.default_rng(3).integers(0, 256, size=(32, 32), dtype=np.uint8)
    out = decode(encode(gray))
    assert all(np.array_equal(out[c], gray) for c in range(3))


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"this is not an image at all", 400, "not an image"),
        (random_image(4)[:200], 400, "truncated"),
        (random_image(5, fmt="TIFF"), 400, "not an image in a supported format"),
        (random_image(6, fmt="JPEG", mode="CMYK"), 400, "CMYK"),
        (encode(np.full((32, 32), 40000, dtype=np.uint16)), 400, "I;16"),
        (random_image(7, w=300, h=300), 413, "the limit is 65536"),
    ],
    ids=["empty", "not-image", "truncated", "tiff", "cmyk", "16-bit", "too-many-pixels"],
)
def test_bad_images_are_refused_with_a_reason(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageInputError, match=message) as info:
        decode(data)
    assert info.value.status == status


def test_predict_resizes_and_crops_but_learn_refuses_another_size() -> None:
    data = random_image(8, w=64, h=48, fmt="JPEG")
    assert decode(data).shape == CHW
    with pytest.raises(ImageInputError, match="must be exactly 32x32"):
        decode(data, exact=True)
    assert decode(random_image(9), exact=True).shape == CHW


def test_gif_uses_its_first_frame() -> None:
    assert decode(random_image(10, fmt="GIF")).shape == CHW


def test_decode_batch_names_the_failing_image() -> None:
    with pytest.raises(ImageInputError, match="image 1 "):
        decode_batch([random_image(11), b"nope"], CHW, max_pixels=LIMIT, exact_size=False)


# -- settings and schemas ----------------------------------------------------------------


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {"BSCE_API_TOKEN": "s3cr3t-token", "BSCE_MAX_BATCH": "8", "BSCE_WORKERS": ""}
    )
    assert s.api_token is not None and s.api_token.get_secret_value() == "s3cr3t-token"
    assert s.max_batch == 8 and s.workers == 2 and s.predict_token is None
    assert "s3cr3t" not in repr(s)
    with pytest.raises(ValueError, match="BSCE_MAX_BATCH"):
        Settings.from_env({"BSCE_MAX_BATCH": "many"})


def test_request_schemas_refuse_empty_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        PredictRequest(images=[])
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"images": ["x"], "topk": 3})
    with pytest.raises(ValidationError):
        LearnRequest(images=["x"], labels=[""])


def test_openapi_document_has_post_and_get_routes() -> None:
    from server.service import BsceServe, openapi_document

    paths = openapi_document(BsceServe)["paths"]
    for path in ["/predict", "/predict/upload", "/learn", "/versions/rollback", "/versions/pin"]:
        assert "post" in paths[path]
    for path in ["/versions", "/versions/current", "/classes", "/jobs/{job_id}", "/health"]:
        assert "get" in paths[path]


# -- gateway middleware -------------------------------------------------------------------


async def _echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"bytes": len(body)})


async def _invalid(_: Request) -> JSONResponse:
    detail = [{"type": "missing", "loc": ["labels"], "msg": "Field required"}]
    return JSONResponse({"error": "1 validation error for Input", "detail": detail}, 400)


def _gateway(**env: str) -> httpx.AsyncClient:
    app = Starlette(
        routes=[
            StarletteRoute("/open", _echo, methods=["POST"]),
            StarletteRoute("/read", _echo, methods=["POST"]),
            StarletteRoute("/admin", _echo, methods=["POST"]),
            StarletteRoute("/upload", _echo, methods=["POST"]),
            StarletteRoute("/invalid", _invalid, methods=["POST"]),
        ]
    )
    routes = {
        ("POST", "/open"): Route("open", (JSON,)),
        ("POST", "/read"): Route("read", (JSON,)),
        ("POST", "/admin"): Route("admin", (JSON,)),
        ("POST", "/upload"): Route("open", (MULTIPART,), file_fields=frozenset({"files"})),
        ("POST", "/invalid"): Route("open", (JSON,)),
    }
    settings = Settings.from_env({"BSCE_MAX_BODY_BYTES": "2048", **env})
    gateway = Gateway(app, routes=routes, settings=settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://t")


def test_gateway_auth() -> None:
    async def run() -> None:
        async with _gateway(BSCE_API_TOKEN="adm", BSCE_PREDICT_TOKEN="rd") as c:
            r = await c.post("/admin", json={})
            assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
            assert (
                await c.post("/admin", json={}, headers={"Authorization": "Bearer rd"})
            ).status_code == 403
            assert (
                await c.post("/admin", json={}, headers={"Authorization": "Basic adm"})
            ).status_code == 401
            assert (
                await c.post("/admin", json={}, headers={"Authorization": "Bearer adm"})
            ).status_code == 200
            assert (await c.post("/read", json={})).status_code == 401
            for token in ("rd", "adm"):
                r = await c.post("/read", json={}, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200
            assert (await c.post("/open", json={})).status_code == 200
        async with _gateway() as c:  # no tokens configured: open
            assert (await c.post("/admin", json={})).status_code == 200
            assert (await c.post("/read", json={})).status_code == 200

    asyncio.run(run())


def test_gateway_limits_and_content_types() -> None:
    async def run() -> None:
        async with _gateway() as c:
            r = await c.post("/open", content=b"x" * 5000, headers={"Content-Type": JSON})
            assert r.status_code == 413 and "limit is 2048" in r.json()["error"]

            async def chunks():  # no Content-Length: counted while read
                for _ in range(5):
                    yield b"x" * 1000

            r = await c.post("/open", content=chunks(), headers={"Content-Type": JSON})
            assert r.status_code == 413
            r = await c.post("/open", content=b"{}", headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and "application/json" in r.json()["error"]
            assert (await c.post("/open", content=b"{}")).status_code == 415
            assert (await c.post("/upload", json={})).status_code == 415
            r = await c.post("/upload", files={"f": ("a.png", b"abc")})
            assert r.status_code == 200
            r = await c.post("/open", content=b"")  # no body: no content type needed
            assert r.status_code == 200 and r.json() == {"bytes": 0}
            assert r.headers["x-worker-pid"].isdigit()
            r = await c.post("/invalid", json={})
            assert (
                r.status_code == 400
                and r.json()["error"] == "invalid request: labels: Field required"
            )

    asyncio.run(run())


# -- holder, watcher ----------------------------------------------------------------------


class _FakeServed:
    def __init__(self, version: int) -> None:
        self.version = version


def test_failing_load_keeps_the_old_version_serving() -> None:
    def loader(v: int):
        if v == 2:
            raise OSError("disk on fire")
        return _FakeServed(v)

    metrics = Metrics()
    holder = ModelHolder(loader, metrics)  # type: ignore[arg-type]
    assert holder.current is None
    assert holder.swap_to(1) and holder.current.version == 1
    assert not holder.swap_to(2)
    assert holder.current.version == 1 and "disk on fire" in (holder.last_error or "")
    assert holder.swap_to(3) and holder.current.version == 3
    text = metrics.text()
    assert "bsce_swap_failures_total 1.0" in text and "bsce_swaps_total 2.0" in text
    assert "bsce_served_version 3.0" in text


def test_requests_in_flight_finish_on_their_version() -> None:
    release = threading.Event()

    def slow_loader(v: int):
        release.wait(5)  # loading v2 takes a while; v1 keeps answering meanwhile
        return _FakeServed(v)

    holder = ModelHolder(lambda v: _FakeServed(v))  # type: ignore[arg-type,return-value]
    holder.swap_to(1)
    holder._loader = slow_loader  # type: ignore[assignment]
    in_flight = holder.current  # a request grabs its version once
    swapper = threading.Thread(target=holder.swap_to, args=(2,))
    swapper.start()
    time.sleep(0.05)
    assert holder.current.version == 1  # still loading: new requests get v1 too
    release.set()
    swapper.join(5)
    assert holder.current.version == 2
    assert in_flight.version == 1  # the request that started before keeps v1


@pytest.mark.integration
def test_served_version_masks_inactive_classes(storage: Storage) -> None:
    save_version(storage, 0, [])
    save_version(storage, 1, ["a", "b", "c"], active=[True, False, True])
    served = load_served(storage.versions, 1, __import__("torch").device("cpu"))
    images = np.random.default_rng(0).integers(0, 256, size=(4, *CHW), dtype=np.uint8)
    probs = served.probabilities(images)
    assert probs.shape == (4, 3) and float(probs[:, 1].abs().max()) == 0.0
    assert np.allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
    scores = served.classify(images, 5)
    assert all(len(s) == 2 and {n for _, n, _ in s} == {"a", "c"} for s in scores)
    v0 = load_served(storage.versions, 0, __import__("torch").device("cpu"))
    assert v0.classify(images, 5) == [[], [], [], []]


@pytest.mark.integration
def test_watcher_follows_the_pointer_and_survives_a_broken_version(storage: Storage) -> None:
    import torch

    save_version(storage, 0, [])
    metrics = Metrics()
    holder = ModelHolder(lambda v: load_served(storage.versions, v, torch.device("cpu")), metrics)
    watcher = VersionWatcher(storage.versions, holder, poll_interval_s=0.1)
    watcher.sync_once()
    assert holder.current is not None and holder.current.version == 0
    assert watcher.store_reachable()

    # A registered version whose payload cannot be built: the old one keeps serving.
    tensors = {"model.bogus": torch.zeros(1)}
    storage.versions.save(1, tensors, {"payload_format": "something-else", "class_names": []})
    storage.versions.set_current(1)
    watcher.start()
    try:
        wait_until(lambda: holder.degraded is not None, 30, "the watcher to see version 1")
        assert holder.current.version == 0 and "failed to load" in (holder.last_error or "")
        assert (holder.degraded.wanted, holder.degraded.served) == (1, 0)
        save_version(storage, 2, ["x", "y"])  # announced: picked up well within a second
        start = time.monotonic()
        while holder.current.version != 2 and time.monotonic() - start < 3:
            time.sleep(0.01)
        assert holder.current.version == 2
        assert time.monotonic() - start < 1.0
    finally:
        watcher.stop()
    assert not watcher.is_alive()
    assert "bsce_swap_failures_total" in metrics.text()
    text = store_metrics_text(storage)
    assert "bsce_current_version 2.0" in text and 'bsce_jobs{state="queued"} 0.0' in text


# -- adaptive batching --------------------------------------------------------------------


@pytest.mark.integration
def test_batcher_answers_each_request_on_its_own_version(storage: Storage) -> None:
    import torch

    save_version(storage, 0, [])
    save_version(storage, 1, ["a", "b"])
    save_version(storage, 2, ["a", "b", "c"])
    cpu = torch.device("cpu")
    v1: ServedVersion = load_served(storage.versions, 1, cpu)
    v2: ServedVersion = load_served(storage.versions, 2, cpu)
    images = np.random.default_rng(1).integers(0, 256, size=(12, *CHW), dtype=np.uint8)
    metrics = Metrics()

    async def run() -> list:
        batcher = SingleImageBatcher(max_batch_size=8, max_latency_ms=5000, metrics=metrics)
        try:
            return await asyncio.gather(
                *(
                    batcher.classify(v1 if i % 2 else v2, images[i], top_k=1 + i % 3)
                    for i in range(len(images))
                )
            )
        finally:
            batcher.shutdown()

    results = asyncio.run(run())
    for i, got in enumerate(results):
        served = v1 if i % 2 else v2
        expected = served.classify(images[i : i + 1], 1 + i % 3)[0]
        assert [(c, n) for c, n, _ in got] == [(c, n) for c, n, _ in expected]
        assert np.allclose([p for *_, p in got], [p for *_, p in expected], atol=1e-5)
    assert "bsce_inference_batch_size_count" in metrics.text()


class _SlowServed:
    """Stands in for a ServedVersion whose forward pass takes 0.2 s."""

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return images

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[int, str, float]]]:
        return [[(0, "a", 1.0)] for _ in range(len(probs))]


def test_batcher_refuses_requests_past_the_latency_cap() -> None:
    async def run() -> list[object]:
        batcher = SingleImageBatcher(max_batch_size=2, max_latency_ms=100, metrics=Metrics())
        image = np.zeros(CHW, dtype=np.uint8)
        try:
            return await asyncio.gather(
                *(batcher.classify(_SlowServed(), image, 1) for _ in range(12)),  # type: ignore[arg-type]
                return_exceptions=True,
            )
        finally:
            batcher.shutdown()

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, Overloaded)]
    answered = [r for r in results if isinstance(r, list)]
    assert refused and answered and len(refused) + len(answered) == len(results)
    assert "latency cap" in str(refused[0])


def test_watcher_reports_an_unreachable_store_and_keeps_trying(tmp_path) -> None:
    import redis

    from storage import VersionStore

    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    versions = VersionStore(dead, "bsce-srvtest-dead", bentoml_home=tmp_path)
    holder = ModelHolder(lambda v: _FakeServed(v))  # type: ignore[arg-type,return-value]
    watcher = VersionWatcher(versions, holder, poll_interval_s=0.05)
    watcher.start()
    try:
        time.sleep(0.5)
        assert watcher.is_alive() and not watcher.store_reachable()
        assert watcher.store_error is not None and "Connection" in watcher.store_error
        assert watcher.store_error.startswith("StoreUnavailableError")  # a storage error
        assert holder.current is None
    finally:
        watcher.stop()
    assert not watcher.is_alive()


@pytest.mark.integration
def test_a_store_that_goes_down_answers_503(redis_process, tmp_path) -> None:
    """Store failures reach the service as storage errors (no redis import there) and become
    503 answers: the learn submission, pointer moves and the GET reads."""
    import json

    from server.service import ApiError, BsceServe
    from storage import StoreUnavailableError, connect

    storage = Storage(connect(redis_process.url), "bsce-srvtest-down", bentoml_home=tmp_path)
    save_version(storage, 0, [])
    svc = BsceServe.inner.__new__(BsceServe.inner)  # the endpoints' logic, without BentoML
    svc.storage, svc.metrics = storage, Metrics()
    svc.holder = ModelHolder(lambda v: None)  # type: ignore[arg-type,return-value]
    redis_process.kill()

    x = np.zeros((1, *CHW), dtype=np.uint8)
    with pytest.raises(ApiError) as e:
        svc._submit(x, ["a"], ["a"], None)
    assert e.value.status == 503 and "unreachable" in str(e.value)
    answer = asyncio.run(svc._move("versions/rollback", lambda v: v.rollback()))
    assert answer.status_code == 503 and "unreachable" in json.loads(answer.body)["error"]
    for read in (svc.list_classes, svc.list_versions, svc.current_version):
        with pytest.raises(StoreUnavailableError):  # `_get` turns these into 503
            read()


# -- hostile input at the gateway (in process) --------------------------------------------


def test_multipart_the_form_parser_would_refuse_or_misread_is_a_4xx() -> None:
    async def run() -> None:
        async with _gateway(BSCE_MAX_BODY_BYTES="3000000") as c:
            image = {"files": ("a.png", b"abc")}
            assert (await c.post("/upload", files=image, data={"top_k": "1"})).status_code == 200
            cases = [
                ({"content": b"abc", "headers": {"Content-Type": MULTIPART}}, 400, "boundary"),
                ({"files": image, "data": {"top_k": "x" * (1024 * 1024 + 1)}}, 413, "text field"),
                ({"files": [("files", (f"{i}.png", b"a")) for i in range(1001)]}, 413, "1000"),
                ({"files": image, "data": {"x": ["1"] * 1001}}, 413, "1000 text fields"),
                (
                    {"content": b"junk", "headers": {"Content-Type": MULTIPART + "; boundary=b"}},
                    400,
                    "malformed",
                ),
                # A text value in a file field: BentoML would fetch it as a URL.
                (
                    {"files": {"other": ("a.png", b"a")}, "data": {"files": "http://x/"}},
                    400,
                    "file",
                ),
            ]
            for kwargs, status, text in cases:
                r = await c.post("/upload", **kwargs)
                assert r.status_code == status, (kwargs.keys(), r.text)
                assert text in r.json()["error"], r.text
            # A bodiless request typed multipart would reach BentoML's form parser too.
            r = await c.post("/open", headers={"Content-Type": MULTIPART})
            assert r.status_code == 415

    asyncio.run(run())


def test_route_misses_answer_json() -> None:
    async def run() -> None:
        async with _gateway() as c:
            r = await c.get("/nope")
            assert r.status_code == 404 and r.json() == {"error": "no route for GET /nope"}
            r = await c.get("/open")
            assert r.status_code == 405 and "POST" in r.json()["error"]
            assert r.headers["allow"] and r.headers["content-type"] == JSON
            r = await c.post("/invalid", json={})  # an endpoint's own JSON answer is kept
            assert r.json()["error"] == "invalid request: labels: Field required"

    asyncio.run(run())


def _scope(path: str, length: int | None) -> dict:
    headers = [(b"content-type", JSON.encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "headers": headers, "query_string": b"", "http_version": "1.1", "scheme": "http",
            "server": ("t", 80), "client": ("c", 1), "root_path": ""}  # fmt: skip


async def _call(
    app: Gateway, length: int | None, messages: asyncio.Queue
) -> tuple[int, dict, dict]:
    """One POST /open through `app`, its body messages taken from `messages` as it reads."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await app(_scope("/open", length), messages.get, send)
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def _body(*chunks: bytes) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    for i, chunk in enumerate(chunks):
        q.put_nowait({"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1})
    return q


def _gateway_app(**env: str) -> Gateway:
    app = Starlette(routes=[StarletteRoute("/open", _echo, methods=["POST"])])
    settings = Settings.from_env({"BSCE_MAX_BODY_BYTES": "2048", **env})
    return Gateway(app, routes={("POST", "/open"): Route("open", (JSON,))}, settings=settings)


def test_inflight_bytes_are_capped_per_worker() -> None:
    async def run() -> None:
        gateway = _gateway_app(BSCE_MAX_INFLIGHT_BYTES="3000")
        held: asyncio.Queue = asyncio.Queue()
        first = asyncio.create_task(_call(gateway, 2000, held))
        await held.put({"type": "http.request", "body": b"x" * 500, "more_body": True})
        for _ in range(10_000):  # charged its Content-Length before its body is read
            if gateway.budget.used == 2000:
                break
            await asyncio.sleep(0)
        assert gateway.budget.used == 2000
        status, headers, body = await _call(gateway, 1500, _body(b"x" * 1500))
        assert status == 503 and headers["retry-after"] == "1" and "in flight" in body["error"]
        status, _, body = await _call(gateway, None, _body(b"x" * 600, b"x" * 600))  # chunked
        assert status == 503
        assert (await _call(gateway, 900, _body(b"x" * 900)))[0] == 200  # fits beside it
        await held.put({"type": "http.request", "body": b"x" * 1500, "more_body": False})
        status, _, body = await first
        assert (status, body) == (200, {"bytes": 2000})
        assert gateway.budget.used == 0
        assert (await _call(gateway, 1500, _body(b"x" * 1500)))[0] == 200
        # A client that goes away mid-body gives its bytes back too.
        assert (await _call(gateway, 2000, _disconnecting(b"x" * 10)))[0] == 400
        assert gateway.budget.used == 0

    asyncio.run(run())


def _disconnecting(chunk: bytes) -> asyncio.Queue:
    q: asyncio.Queue = asyncio.Queue()
    q.put_nowait({"type": "http.request", "body": chunk, "more_body": True})
    q.put_nowait({"type": "http.disconnect"})
    return q


def test_settings_keep_one_body_within_the_inflight_cap() -> None:
    with pytest.raises(ValueError, match="BSCE_MAX_INFLIGHT_BYTES must be at least"):
        Settings.from_env({"BSCE_MAX_BODY_BYTES": "4096", "BSCE_MAX_INFLIGHT_BYTES": "2048"})
    assert Settings.from_env({}).max_inflight_bytes == 64 * 1024 * 1024


def test_forget_dead_workers_drops_only_the_dead_pids(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"gauge_liveall_{dead.pid}.db", f"gauge_liveall_{os.getpid()}.db",
                 f"counter_{dead.pid}.db"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    assert forget_dead_workers(str(tmp_path)) == [dead.pid]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"counter_{dead.pid}.db", f"gauge_liveall_{os.getpid()}.db"])


# -- strict types, idempotency keys -------------------------------------------------------


def test_json_requests_take_values_as_typed() -> None:
    from server.schemas import PinRequest
    from server.service import ApiError, _checked_overrides

    for bad in ({"images": ["x"], "top_k": True}, {"images": ["x"], "top_k": "3"}):
        with pytest.raises(ValidationError):
            PredictRequest.model_validate_json(json.dumps(bad))
    with pytest.raises(ValidationError):
        PinRequest.model_validate_json('{"version": "0"}')
    for bad in ({"epochs": "3"}, {"epochs": True}, {"distill": 1}, {"epochs": 2.0}):
        with pytest.raises(ApiError) as e:
            _checked_overrides(bad)
        assert e.value.status == 400 and "overrides" in str(e.value)
    assert _checked_overrides({"epochs": 3, "lr": 1}) == {"epochs": 3, "lr": 1.0}


def test_idempotency_keys_and_request_digests() -> None:
    from server.service import ApiError, _checked_idempotency_key, request_digest

    assert _checked_idempotency_key([]) is None
    assert _checked_idempotency_key(["retry-7f3a"]) == "retry-7f3a"
    for bad in (["a b"], ["é"], ["x" * 201], [""], ["a", "b"]):
        with pytest.raises(ApiError) as e:
            _checked_idempotency_key(bad)
        assert e.value.status == 400
    x = np.zeros((2, *CHW), dtype=np.uint8)
    one = request_digest(x, ["a", "b"], ["a", "b"], {"epochs": 1})
    assert one == request_digest(x.copy(), ["a", "b"], ["a", "b"], {"epochs": 1})
    others = [
        request_digest(x, ["b", "a"], ["a", "b"], {"epochs": 1}),
        request_digest(x, ["a", "b"], ["b", "a"], {"epochs": 1}),
        request_digest(x, ["a", "b"], ["a", "b"], None),
        request_digest(x + 1, ["a", "b"], ["a", "b"], {"epochs": 1}),
    ]
    assert len({one, *others}) == 5


# -- a pointer version that does not load -------------------------------------------------


def test_holder_degraded_with_nothing_to_fall_back_on() -> None:
    def loader(v: int):
        raise OSError(f"disk on fire ({v})")

    holder = ModelHolder(loader)  # type: ignore[arg-type]
    assert not holder.swap_to(3) and not holder.serve_fallback(3, 2, "version 3: broken")
    assert holder.serve_fallback(3, None, "version 3: broken")
    assert holder.degraded == Degraded(3, None, "version 3: broken")
    assert holder.current is None and "serving nothing" in holder.degraded.describe()


@pytest.mark.integration
def test_an_unloadable_pointer_version_serves_its_lineage_until_it_loads(storage: Storage) -> None:
    import torch

    save_version(storage, 0, [])
    save_version(storage, 1, ["a"])
    save_version(storage, 2, ["a", "b"])
    save_version(storage, 3, ["a", "c"], parent=1)  # newer than 2, but another branch
    save_version(storage, 4, ["a", "b", "d"], parent=2)
    assert storage.versions.fallbacks(4) == [2, 1, 0, 3]
    original = truncate_weights(storage, 4)
    truncate_weights(storage, 2)
    metrics = Metrics()
    holder = ModelHolder(lambda v: load_served(storage.versions, v, torch.device("cpu")), metrics)
    watcher = VersionWatcher(storage.versions, holder, poll_interval_s=0.1)

    watcher.sync_once()  # a worker starting now: v4 and its parent v2 are broken
    assert holder.current is not None and holder.current.version == 1
    assert (holder.degraded.wanted, holder.degraded.served) == (4, 1)
    assert "version 4" in holder.degraded.error and "digest" in holder.degraded.error
    text = metrics.text()
    assert "bsce_degraded 1.0" in text and "bsce_swap_failures_total 2.0" in text

    watcher.sync_once()  # the next poll retries v4 (quietly: counted once)
    assert holder.current.version == 1 and "bsce_swap_failures_total 2.0" in metrics.text()

    storage.versions.set_current(1)  # a pointer move to the fallback itself: not degraded
    watcher.sync_once()
    assert holder.current.version == 1 and holder.degraded is None

    storage.versions.set_current(4)
    weights_file(storage, 4).write_bytes(original)  # the operator restores the file
    watcher.sync_once()
    assert holder.current.version == 4 and holder.degraded is None
    assert holder.last_error is None and "bsce_degraded 0.0" in metrics.text()
