"""The bsce-serve HTTP service (BentoML).

    bentoml serve server.service:BsceServe --port 3000

Each of the ``BSCE_WORKERS`` worker processes builds one `BsceServe`: it opens the storage
(``REDIS_URL`` or the embedded Redis), starts its `VersionWatcher`, and serves the version
the storage pointer names. Endpoints, limits and decisions: server/README.md; settings:
`server.settings`. No training happens here: learn requests are validated, decoded and
queued for the learner worker (``python -m learner.worker``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import bentoml
import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute

from learner.core.images import training_side
from learner.core.machine import resolve_device
from learner.core.overrides import JobOverrides
from storage import (
    IdempotencyConflictError,
    InvalidInputError,
    JobTooLargeError,
    NoPreviousVersionError,
    NotRejectedError,
    PinnedError,
    RejectedVersionError,
    SessionInfo,
    SessionStateError,
    SessionTooLargeError,
    Storage,
    StorageError,
    UnknownJobError,
    UnknownSessionError,
    UnknownVersionError,
    VersionStore,
    open_storage,
    validate_name,
)

from .batching import Overloaded, SingleImageBatcher
from .holder import ModelHolder, Score, ServedVersion, VersionWatcher, load_served
from .images import ImageInputError, b64decode, decode_batch
from .metrics import Metrics, store_metrics_text
from .middleware import JSON, MULTIPART, Gateway, Route
from .schemas import (
    ClassInfo,
    ClassList,
    CurrentVersion,
    DegradedState,
    ErrorBody,
    Health,
    ImagePrediction,
    JobAccepted,
    JobList,
    JobStatusResponse,
    LabelScore,
    LearnRequest,
    LearnUpload,
    PinRequest,
    PointerChange,
    PredictRequest,
    PredictResponse,
    PredictUpload,
    SessionAborted,
    SessionBatch,
    SessionOpen,
    SessionStatus,
    VersionDetail,
    VersionList,
    WorkerVersion,
)
from .settings import Settings

log = logging.getLogger("bsce.server")
JOB_ID = re.compile(r"[0-9a-f]{32}")
# Visible ASCII, as the store takes it (storage.jobs), and short enough to log.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
JOBS_LIMIT = (1, 500)

# Read at import for the decorator (worker count, batching); frozen, like the environment.
BOOT_SETTINGS = Settings.from_env()


class ApiError(Exception):
    """A refusal with its HTTP status; turned into ``{"error": ...}`` by the endpoint."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _json(model: BaseModel, status: int = 200) -> Any:
    # Typed Any: endpoints are annotated with their success model (for OpenAPI) and BentoML
    # sends a returned Response as it is.
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


# -- read-only routes (GET), mounted next to the BentoML endpoints ------------------------


async def _get(fn: Callable[[Any], BaseModel]) -> Response:
    # The instance BentoML built in this worker (its service object's only state holder).
    svc = bentoml.get_current_service()
    try:
        result = await anyio.to_thread.run_sync(fn, svc)
    except ApiError as e:
        return JSONResponse({"error": str(e)}, status_code=e.status)
    except StorageError as e:  # Redis down or refusing: storage.boundary translated it
        log.warning("store error: %s", e)
        return JSONResponse({"error": f"the store is unavailable: {e}"}, status_code=503)
    return _json(result)


async def _http_versions(_: Request) -> Response:
    return await _get(lambda s: s.list_versions())


async def _http_current(_: Request) -> Response:
    return await _get(lambda s: s.current_version())


async def _http_version(request: Request) -> Response:
    version = request.path_params["version"]
    return await _get(lambda s: s.version_detail(version))


async def _http_classes(_: Request) -> Response:
    return await _get(lambda s: s.list_classes())


async def _http_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    return await _get(lambda s: s.job_status(job_id))


async def _http_jobs(request: Request) -> Response:
    low, high = JOBS_LIMIT
    raw = request.query_params.get("limit", "50")
    if not (raw.isascii() and raw.isdigit() and low <= int(raw) <= high):
        return JSONResponse(
            {"error": f"limit must be a whole number from {low} to {high}, got {raw!r}"},
            status_code=400,
        )
    limit = int(raw)
    return await _get(lambda s: s.list_jobs(limit))


async def _http_health(_: Request) -> Response:
    service = bentoml.get_current_service()
    health = service.health()
    # Bytes of the served version and of one being loaded beside it; CUDA allocator figures.
    body = {**health.model_dump(mode="json"), "model_memory": service.holder.memory()}
    return JSONResponse(body, status_code=200 if health.ready else 503)


async def _http_openapi(_: Request) -> Response:
    return JSONResponse(openapi_document(BsceServe))


GET_ROUTES: list[tuple[str, Callable[[Request], Any], type[BaseModel], str]] = [
    ("/versions", _http_versions, VersionList, "All saved versions and the serving pointer"),
    ("/versions/current", _http_current, CurrentVersion, "The served version"),
    (
        "/versions/{version:int}",
        _http_version,
        VersionDetail,
        "One version with the learner's config, seed and step report",
    ),
    ("/classes", _http_classes, ClassList, "Classes the served version predicts, with counts"),
    ("/jobs", _http_jobs, JobList, "The newest learning jobs (?limit=50)"),
    ("/jobs/{job_id}", _http_job, JobStatusResponse, "One learning job's status"),
    ("/health", _http_health, Health, "Readiness in detail (503 when not ready)"),
]


async def _http_promote(request: Request) -> Response:
    # A path parameter, which BentoML's @api routes do not take: served by the mounted app.
    version = request.path_params["version"]
    return await bentoml.get_current_service().promote(version)


async def _http_session_open(request: Request) -> Response:
    return await bentoml.get_current_service().session_open(request)


async def _http_session(request: Request) -> Response:
    svc = bentoml.get_current_service()
    sid = request.path_params["session_id"]
    if request.method == "DELETE":
        return await svc.session_abort(sid)
    return await svc.session_status(sid)


async def _http_session_batch(request: Request) -> Response:
    return await bentoml.get_current_service().session_append(
        request, request.path_params["session_id"]
    )


async def _http_session_commit(request: Request) -> Response:
    return await bentoml.get_current_service().session_commit(request.path_params["session_id"])


# Upload sessions (path parameters, so served by the mounted app; server/README.md).
SESSION_ROUTES = [
    StarletteRoute("/sessions", _http_session_open, methods=["POST"]),
    StarletteRoute("/sessions/{session_id}", _http_session, methods=["GET", "DELETE"]),
    StarletteRoute("/sessions/{session_id}/batches", _http_session_batch, methods=["POST"]),
    StarletteRoute("/sessions/{session_id}/commit", _http_session_commit, methods=["POST"]),
]

read_app = Starlette(
    routes=[StarletteRoute(path, fn, methods=["GET"]) for path, fn, _, _ in GET_ROUTES]
    + [
        StarletteRoute("/openapi.json", _http_openapi, methods=["GET"]),
        StarletteRoute("/versions/{version:int}/promote", _http_promote, methods=["POST"]),
    ]
    + SESSION_ROUTES
)

GATEWAY_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/predict"): Route("read", (JSON,)),
    ("POST", "/predict/upload"): Route("read", (MULTIPART,), file_fields=frozenset({"files"})),
    ("POST", "/learn"): Route("admin", (JSON,)),
    ("POST", "/learn/upload"): Route("admin", (MULTIPART,), file_fields=frozenset({"files"})),
    ("POST", "/versions/rollback"): Route("admin", (JSON,)),
    ("POST", "/versions/pin"): Route("admin", (JSON,)),
    ("POST", "/versions/unpin"): Route("admin", (JSON,)),
    ("POST", "/sessions"): Route("admin", (JSON,), reword_validation=False),
    ("GET", "/versions"): Route("read", reword_validation=False),
    ("GET", "/versions/current"): Route("read", reword_validation=False),
    ("GET", "/classes"): Route("read", reword_validation=False),
    ("GET", "/jobs"): Route("read", reword_validation=False),
}
GATEWAY_PREFIXES = [
    ("GET", "/jobs/", Route("read", reword_validation=False)),
    ("GET", "/versions/", Route("read", reword_validation=False)),
    # POST /versions/{version}/promote (the exact /versions/* routes above match first)
    ("POST", "/versions/", Route("admin", (JSON,), reword_validation=False)),
    # Upload sessions: batches are JSON or multipart (``files`` parts), commit has no body.
    (
        "POST",
        "/sessions/",
        Route(
            "admin", (JSON, MULTIPART), reword_validation=False, file_fields=frozenset({"files"})
        ),
    ),
    ("GET", "/sessions/", Route("admin", reword_validation=False)),
    ("DELETE", "/sessions/", Route("admin", reword_validation=False)),
]


# -- the service ---------------------------------------------------------------------------


@bentoml.asgi_app(read_app, path="/")
@bentoml.service(
    name="bsce-serve",
    workers=BOOT_SETTINGS.workers,
    traffic={"timeout": 300},
)
class BsceServe:
    """Predicts with the served model version; queues posted classes for the learner."""

    def __init__(self) -> None:
        self.settings = Settings.from_env()
        self.pid = os.getpid()
        # BentoML's logging config keeps the root logger at WARNING; swaps are worth an INFO.
        log.setLevel(logging.INFO)
        torch.set_num_threads(self.settings.threads())
        self.device = resolve_device(self.settings.device)
        self.metrics = Metrics()
        self.storage: Storage = open_storage()
        versions = self.storage.versions
        self.holder = ModelHolder(
            lambda v: load_served(
                versions, v, self.device, self.settings.precision, self.holder.loading_resident
            ),
            self.metrics,
        )
        self.watcher = VersionWatcher(versions, self.holder, self.settings.poll_interval_s)
        self.watcher.start()
        self.batcher = SingleImageBatcher(
            self.settings.batch_max_size, self.settings.batch_max_latency_ms, self.metrics
        )
        if self.settings.api_token is None:
            log.warning("BSCE_API_TOKEN is not set: learn, rollback, pin and unpin are open")
        log.info(
            "worker %d: device %s (precision %s), %d torch threads, store prefix %r",
            self.pid,
            self.device,
            self.settings.precision,
            torch.get_num_threads(),
            self.storage.prefix,
        )

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.watcher.stop()
        self.batcher.shutdown()
        # With the embedded Redis, the last process to close its client stops the server.
        self.storage.close()

    # -- BentoML hooks ---------------------------------------------------------------------

    def __is_ready__(self) -> bool:
        return self.holder.current is not None and self.watcher.store_reachable()

    def __metrics__(self, content: str) -> str:
        served = self.holder.current
        self.metrics.served_version.set(-1 if served is None else served.version)
        self.holder.memory()  # sets the memory gauges
        return content + store_metrics_text(self.storage)

    def health(self) -> Health:
        served = self.holder.current
        reachable = self.watcher.store_reachable()
        degraded = self.holder.degraded
        detail = degraded.describe() if degraded is not None else self.holder.last_error
        if served is None and detail is None:
            detail = (
                "no model version yet (the learner worker creates version 0)"
                if reachable and self.watcher.target is None
                else "loading the model"
            )
        if not reachable:
            detail = f"store unreachable: {self.watcher.store_error or 'no reply yet'}"
        return Health(
            ready=served is not None and reachable,
            model_loaded=served is not None,
            store_reachable=reachable,
            version=None if served is None else served.version,
            pointer=self.watcher.target,
            worker_pid=self.pid,
            degraded=None
            if degraded is None
            else DegradedState(
                wanted=degraded.wanted, served=degraded.served, error=degraded.error
            ),
            detail=detail,
        )

    # -- predict ---------------------------------------------------------------------------

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, images: list[str], top_k: int | None = None) -> PredictResponse:
        """Top-k labels of one image or a batch (JSON, base64 images).

        A request with one image joins BentoML's adaptive batching (latency cap:
        BSCE_BATCH_MAX_LATENCY_MS, then 503); a batch runs as one forward pass. The answer
        names the model version that produced it; all images of a request see one version.
        """
        return await self._predict(
            "predict",
            lambda: [b64decode(s, f"image {i}") for i, s in enumerate(images)],
            len(images),
            top_k,
        )

    @bentoml.api(route="/predict/upload", input_spec=PredictUpload)
    async def predict_upload(self, files: list[Path], top_k: int | None = None) -> PredictResponse:
        """Like /predict, with the images as multipart/form-data ``files`` parts."""
        return await self._predict("predict/upload", lambda: _read_files(files), len(files), top_k)

    async def _predict(
        self, endpoint: str, blobs: Callable[[], list[bytes]], count: int, top_k: int | None
    ) -> Any:
        try:
            served = self._served()
            k = self._top_k(top_k)
            if count > self.settings.max_batch:
                raise ApiError(
                    413, f"{count} images in one request; the limit is {self.settings.max_batch}"
                )
            images = await self._decode(endpoint, blobs, served.chw, exact_size=False)
            if count == 1:
                scores = [await self.batcher.classify(served, images[0], k)]
                self.metrics.predictions.labels("single").inc()
            else:
                scores = await anyio.to_thread.run_sync(self._classify_batch, served, images, k)
                self.metrics.predictions.labels("batch").inc(count)
        except ApiError as e:
            return self._refuse(endpoint, e)
        except Overloaded as e:
            return self._refuse(endpoint, ApiError(503, str(e)))
        return _json(
            PredictResponse(
                version=served.version,
                worker_pid=self.pid,
                num_classes=served.num_active,
                predictions=[
                    ImagePrediction(
                        labels=[LabelScore(index=i, label=n, probability=p) for i, n, p in s]
                    )
                    for s in scores
                ],
            )
        )

    def _classify_batch(
        self, served: ServedVersion, images: np.ndarray, k: int
    ) -> list[list[Score]]:
        start = time.perf_counter()
        scores = served.classify(images, k)
        self.metrics.inference_seconds.labels("batch").observe(time.perf_counter() - start)
        self.metrics.batch_size.labels("batch").observe(len(images))
        return scores

    # -- learn -----------------------------------------------------------------------------

    @bentoml.api(route="/learn", input_spec=LearnRequest)
    async def learn(
        self,
        ctx: bentoml.Context,
        images: list[str],
        labels: list[str],
        classes: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
        validation_images: list[str] | None = None,
        validation_labels: list[str] | None = None,
    ) -> JobAccepted:
        """Queue labelled images (base64, JSON) for learning; answers 202 with a job id.

        Nothing is stored or queued unless every image, label and override is valid. With
        an ``Idempotency-Key`` header, a repeat of the same request answers 200 with the
        first one's job; the same key with another body is refused with 409.
        ``validation_images``/``validation_labels``: an explicit validation set, which the
        promotion gate judges its classes on instead of a tenth of their posted images.
        """
        extra = validation_images or []
        answer = await self._learn(
            "learn",
            lambda: (
                [b64decode(s, f"image {i}") for i, s in enumerate(images)]
                + [b64decode(s, f"validation image {i}") for i, s in enumerate(extra)]
            ),
            len(images),
            labels,
            classes,
            overrides,
            ctx.request.headers.getlist("idempotency-key"),
            _Validation(len(extra), validation_labels),
        )
        return _with_status(ctx, answer)

    @bentoml.api(route="/learn/upload", input_spec=LearnUpload)
    async def learn_upload(
        self,
        ctx: bentoml.Context,
        files: list[Path],
        labels: list[str],
        classes: list[str] | None = None,
        overrides: dict[str, Any] | None = None,
        validation_files: list[Path] | None = None,
        validation_labels: list[str] | None = None,
    ) -> JobAccepted:
        """Like /learn, with multipart/form-data ``files`` parts and a ``labels`` field
        holding a JSON array of class names, one per file (``validation_files`` and
        ``validation_labels`` likewise)."""
        extra = validation_files or []
        answer = await self._learn(
            "learn/upload",
            lambda: _read_files([*files, *extra]),
            len(files),
            labels,
            classes,
            overrides,
            ctx.request.headers.getlist("idempotency-key"),
            _Validation(len(extra), validation_labels),
        )
        return _with_status(ctx, answer)

    async def _learn(
        self,
        endpoint: str,
        blobs: Callable[[], list[bytes]],
        count: int,
        labels: Sequence[str],
        classes: Sequence[str] | None,
        overrides: dict[str, Any] | None,
        idempotency_keys: Sequence[str] = (),
        validation: _Validation | None = None,
    ) -> JSONResponse:
        validation = validation or _Validation(0, None)
        try:
            key = _checked_idempotency_key(idempotency_keys)
            served = self._served()
            limit = self.settings.max_learn_images
            if count + validation.count > limit:
                raise ApiError(
                    413,
                    f"{count + validation.count} images in one request (validation images "
                    f"included); the limit is {limit}",
                )
            if len(labels) != count:
                raise ApiError(
                    400, f"{count} images but {len(labels)} labels; send one label per image"
                )
            names = [_checked_name(n, i) for i, n in enumerate(labels)]
            held = validation.checked_names()
            order = _checked_classes(classes, names)
            checked_overrides = _checked_overrides(overrides)
            samples = await self._decode(endpoint, blobs, _learn_shape(served), exact_size=False)
            accepted = await anyio.to_thread.run_sync(
                self._submit, samples, names + held, order, checked_overrides, key, len(held)
            )
        except ApiError as e:
            return self._refuse(endpoint, e)
        if accepted.replayed:
            return _json(accepted, status=200)
        self.metrics.jobs_submitted.inc()
        return _json(accepted, status=202)

    def _submit(
        self,
        samples: np.ndarray,
        names: list[str],
        classes: list[str],
        overrides: dict[str, Any] | None,
        idempotency_key: str | None = None,
        validation: int = 0,
    ) -> JobAccepted:
        # One transaction registers the new class names and queues the job (and records
        # the idempotency key): a refused or failed submission leaves none of them.
        digest = None
        if idempotency_key is not None:
            digest = request_digest(samples, names, classes, overrides, validation)
        try:
            job = self.storage.jobs.submit_job(
                samples, names, overrides, classes, idempotency_key, digest, validation
            )
            state = self.storage.jobs.status(job.job_id).state if job.replayed else "queued"
        except JobTooLargeError as e:
            raise ApiError(413, str(e)) from None
        except IdempotencyConflictError as e:
            raise ApiError(409, str(e)) from None
        except InvalidInputError as e:
            raise ApiError(400, str(e)) from None
        except StorageError as e:
            raise ApiError(503, f"the store is unavailable: {e}") from None
        return JobAccepted(
            job_id=job.job_id,
            state=state,
            replayed=job.replayed,
            status_url=f"/jobs/{job.job_id}",
            num_samples=int(samples.shape[0]),
            validation=validation,
            classes=job.classes,
            new_classes=job.new_classes,
        )

    # -- upload sessions (storage/sessions.py; server/README.md) ----------------------------

    async def session_open(self, request: Request) -> Any:
        """POST /sessions: a new session for the posted classes (201)."""
        try:
            body = _parse_json(SessionOpen, await request.body())
            order = [_checked_name(n, i, field="classes") for i, n in enumerate(body.classes)]
            if len(set(order)) != len(order):
                raise ApiError(400, "classes must list each class once")
            overrides = _checked_overrides(body.overrides)
            info = await self._session_call(lambda: self.storage.sessions.open(order, overrides))
        except ApiError as e:
            return self._refuse("sessions", e)
        return _json(_session_status(info), status=201)

    async def session_append(self, request: Request, session_id: str) -> Any:
        """POST /sessions/{id}/batches: decode one batch (JSON or multipart, any image
        size, the learn transform) and store it in chunks; all or nothing."""
        endpoint = "sessions/batches"
        try:
            if "multipart/form-data" in request.headers.get("content-type", ""):
                files, labels, expected = await _session_form(request)
                count = len(files)

                def blobs() -> list[bytes]:
                    return files
            else:
                body = _parse_json(SessionBatch, await request.body())
                images, labels, expected = body.images, body.labels, body.expected_samples
                count = len(images)

                def blobs() -> list[bytes]:
                    return [b64decode(t, f"image {i}") for i, t in enumerate(images)]

            served = self._served()
            limit = self.settings.max_learn_images
            if count > limit:
                raise ApiError(413, f"{count} images in one batch; the limit is {limit}")
            if len(labels) != count:
                raise ApiError(
                    400, f"{count} images but {len(labels)} labels; send one label per image"
                )
            names = [_checked_name(n, i) for i, n in enumerate(labels)]
            samples = await self._decode(endpoint, blobs, _learn_shape(served), exact_size=False)
            info = await self._session_call(
                lambda: self.storage.sessions.append(session_id, samples, names, expected)
            )
        except ApiError as e:
            return self._refuse(endpoint, e)
        return _json(_session_status(info))

    async def session_status(self, session_id: str) -> Any:
        """GET /sessions/{id}."""
        try:
            info = await self._session_call(lambda: self.storage.sessions.info(session_id))
        except ApiError as e:
            return self._refuse("sessions", e)
        return _json(_session_status(info))

    async def session_commit(self, session_id: str) -> Any:
        """POST /sessions/{id}/commit: queue the session as one job, as /learn does (202;
        200 with the same job for a repeat)."""
        try:

            def commit() -> JobAccepted:
                job = self.storage.sessions.commit(session_id)
                status = self.storage.jobs.status(job.job_id)
                return JobAccepted(
                    job_id=job.job_id,
                    state=status.state if job.replayed else "queued",
                    replayed=job.replayed,
                    status_url=f"/jobs/{job.job_id}",
                    num_samples=status.num_samples,
                    classes=job.classes,
                    new_classes=job.new_classes,
                )

            accepted = await self._session_call(commit)
        except ApiError as e:
            return self._refuse("sessions/commit", e)
        if accepted.replayed:
            return _json(accepted, status=200)
        self.metrics.jobs_submitted.inc()
        return _json(accepted, status=202)

    async def session_abort(self, session_id: str) -> Any:
        """DELETE /sessions/{id}: discard an open session and its samples."""
        try:
            await self._session_call(lambda: self.storage.sessions.abort(session_id))
        except ApiError as e:
            return self._refuse("sessions", e)
        return _json(SessionAborted(session_id=session_id))

    async def _session_call(self, fn: Callable[[], Any]) -> Any:
        """Run a session store call in a thread, its refusals as `ApiError`s."""

        def run() -> Any:
            try:
                return fn()
            except UnknownSessionError as e:
                raise ApiError(404, str(e.args[0] if e.args else e)) from None
            except SessionStateError as e:  # committed, or expected_samples differs
                raise ApiError(409, str(e)) from None
            except (SessionTooLargeError, JobTooLargeError) as e:
                raise ApiError(413, str(e)) from None
            except InvalidInputError as e:
                raise ApiError(400, str(e)) from None
            except StorageError as e:
                raise ApiError(503, f"the store is unavailable: {e}") from None

        return await anyio.to_thread.run_sync(run)

    # -- versions --------------------------------------------------------------------------

    @bentoml.api(route="/versions/rollback")
    async def rollback(self) -> PointerChange:
        """Serve the version served before the current one (refused while pinned)."""
        return await self._move("versions/rollback", lambda v: v.rollback(reason="api rollback"))

    @bentoml.api(route="/versions/pin", input_spec=PinRequest)
    async def pin(self, version: int) -> PointerChange:
        """Serve `version` and keep serving it (new versions are saved but not served)."""
        return await self._move("versions/pin", lambda v: v.pin(version, reason="api pin"))

    @bentoml.api(route="/versions/unpin")
    async def unpin(self) -> PointerChange:
        """Lift the pin and serve the newest version."""
        return await self._move("versions/unpin", lambda v: v.unpin(reason="api unpin"))

    async def promote(self, version: int) -> Any:
        """Serve a version the promotion gate rejected (POST /versions/{version}/promote)."""
        return await self._move(
            "versions/promote", lambda v: v.promote(version, reason="api promote")
        )

    async def _move(self, endpoint: str, change: Callable[[VersionStore], object]) -> Any:
        versions = self.storage.versions

        def run() -> PointerChange:
            try:
                before = versions.current()
                change(versions)
                state = versions.pointer()
            except (PinnedError, NoPreviousVersionError, RejectedVersionError) as e:
                raise ApiError(409, str(e)) from None
            except NotRejectedError as e:
                raise ApiError(409, str(e)) from None
            except UnknownVersionError as e:
                raise ApiError(404, str(e)) from None
            except StorageError as e:  # Redis down or refusing
                raise ApiError(503, f"the store is unavailable: {e}") from None
            return PointerChange(current=state.current, pinned=state.pinned, previous=before)

        try:
            result = await anyio.to_thread.run_sync(run)
        except ApiError as e:
            return self._refuse(endpoint, e)
        return _json(result)

    # -- reads (served as GET routes by `read_app`) ----------------------------------------

    def list_versions(self) -> VersionList:
        versions = self.storage.versions
        state = versions.pointer()
        return VersionList(
            current=state.current,
            pinned=state.pinned,
            history=state.history,
            versions=versions.list(),
        )

    def version_detail(self, version: int) -> VersionDetail:
        versions = self.storage.versions
        try:
            info = versions.info(version)
            meta = versions.metadata(version)
        except UnknownVersionError as e:
            raise ApiError(404, str(e)) from None
        return VersionDetail(
            info=info,
            **{k: meta.get(k) for k in VersionDetail.model_fields if k != "info"},
        )

    def current_version(self) -> CurrentVersion:
        versions = self.storage.versions
        state = versions.pointer()
        served = self.holder.current
        return CurrentVersion(
            version=state.current,
            pinned=state.pinned,
            info=None if state.current is None else versions.info(state.current),
            worker=WorkerVersion(
                worker_pid=self.pid, version=None if served is None else served.version
            ),
        )

    def list_classes(self) -> ClassList:
        s = self.storage
        current = s.versions.current()
        info = None if current is None else s.versions.info(current)
        names = s.labels.names()
        # The memory of the version served (its generation), not some other one.
        memory_info = None if current is None else s.versions.memory_info(current)
        memory = {} if memory_info is None else memory_info.counts
        classes: list[ClassInfo] = []
        if info is not None:
            counts = info.counts
            count_of = (
                (lambda i, n: int(counts.get(n, 0)))
                if isinstance(counts, dict)
                else (lambda i, n: int(counts[i]) if i < len(counts) else 0)
            )
            served = self.holder.current
            active = (
                served.active
                if served is not None and served.version == current
                else (True,) * len(info.class_names)
            )
            for i, name in enumerate(info.class_names):
                if i < len(active) and active[i]:
                    classes.append(
                        ClassInfo(
                            index=i, name=name, count=count_of(i, name), exemplars=memory.get(i, 0)
                        )
                    )
        known = {c.name for c in classes}
        return ClassList(
            version=current, classes=classes, pending=[n for n in names if n not in known]
        )

    def job_status(self, job_id: str) -> JobStatusResponse:
        if not JOB_ID.fullmatch(job_id):
            # Job ids are uuid4 hex; anything else could name another key under the prefix.
            raise ApiError(404, f"no job with id {job_id!r}")
        try:
            status = self.storage.jobs.status(job_id)
        except UnknownJobError as e:
            raise ApiError(404, str(e)) from None
        served = None
        if status.state == "done" and status.version is not None:
            served = self.storage.versions.current() == status.version
        return JobStatusResponse(**status.model_dump(), served=served)

    def list_jobs(self, limit: int) -> JobList:
        return JobList(
            jobs=[JobStatusResponse(**j.model_dump()) for j in self.storage.jobs.list(limit)]
        )

    # -- helpers ---------------------------------------------------------------------------

    def _served(self) -> ServedVersion:
        served = self.holder.current  # once per request: the request keeps this version
        if served is None:
            raise ApiError(503, "no model version is loaded yet; see /health")
        return served

    def _top_k(self, top_k: int | None) -> int:
        k = self.settings.top_k if top_k is None else top_k
        if k > self.settings.max_top_k:
            raise ApiError(400, f"top_k is {k}; the limit is {self.settings.max_top_k}")
        return k

    async def _decode(
        self,
        endpoint: str,
        blobs: Callable[[], list[bytes]],
        chw: tuple[int, int, int],
        *,
        exact_size: bool,
    ) -> np.ndarray:
        def run() -> np.ndarray:
            start = time.perf_counter()
            data = blobs()
            out = decode_batch(
                data, chw, max_pixels=self.settings.max_image_pixels, exact_size=exact_size
            )
            self.metrics.decode_seconds.labels(endpoint).observe(time.perf_counter() - start)
            return out

        try:
            return await anyio.to_thread.run_sync(run)
        except ImageInputError as e:
            raise ApiError(e.status, str(e)) from None

    def _refuse(self, endpoint: str, error: ApiError) -> Any:
        self.metrics.rejected.labels(endpoint, str(error.status)).inc()
        if error.status >= 500:
            log.warning("%s: %s", endpoint, error)
        return JSONResponse({"error": str(error)}, status_code=error.status)


BsceServe.add_asgi_middleware(
    Gateway, routes=GATEWAY_ROUTES, prefixes=GATEWAY_PREFIXES, settings=BOOT_SETTINGS
)


def _learn_shape(served: ServedVersion) -> tuple[int, int, int]:
    """(C, S, S) a learn image is stored at: any posted size is mapped there by the one
    transform the data loaders use (`learner.core.images.training_side`: shorter side
    resized, centre crop; 32 for the CIFAR models, 256 for the 224-crop ones)."""
    augment = served.loaded.augment
    side = training_side(augment.crop, augment.pad)
    return (served.chw[0], side, side)


def _parse_json(model: type[BaseModel], raw: bytes) -> Any:
    """A JSON body as `model` (strict, unknown fields refused), else 400 saying why."""
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise ApiError(400, f"malformed JSON: {problems}") from None
        raise ApiError(400, f"invalid request: {problems}") from None


async def _session_form(request: Request) -> tuple[list[bytes], list[Any], int | None]:
    """A multipart batch (the gateway checked it parses): ``files`` parts, ``labels`` (a
    JSON array), optional ``expected_samples``."""
    form = await request.form()
    files = form.getlist("files")
    blobs = [await f.read() for f in files if hasattr(f, "read")]  # type: ignore[union-attr]
    if not blobs:
        raise ApiError(400, "files: send one or more files parts (the images)")

    def field(name: str) -> Any:
        raw = form.get(name)
        if raw is None:
            return None
        try:
            return json.loads(str(raw))
        except json.JSONDecodeError:
            raise ApiError(400, f"{name} must be JSON (labels: an array of names)") from None

    labels = field("labels")
    if not isinstance(labels, list) or not labels:
        raise ApiError(400, "labels must be a JSON array of class names, one per file")
    expected = field("expected_samples")
    if expected is not None and (
        isinstance(expected, bool) or not isinstance(expected, int) or expected < 0
    ):
        raise ApiError(400, "expected_samples must be a whole number")
    return blobs, labels, expected


def _session_status(info: SessionInfo) -> SessionStatus:
    return SessionStatus(
        session_id=info.id,
        state=info.state,
        expires_in_s=info.expires_in_s,
        classes=info.classes,
        counts=info.counts,
        num_samples=info.num_samples,
        num_chunks=info.num_chunks,
        bytes=info.bytes,
        sample_shape=info.sample_shape,
        store=info.store,
        job_id=None if info.job is None else info.job.job_id,
    )


@dataclass(frozen=True)
class _Validation:
    """A learn request's explicit validation set: how many images, and their labels."""

    count: int
    labels: Sequence[str] | None

    def checked_names(self) -> list[str]:
        """The validation labels, one valid class name per validation image."""
        labels = self.labels or []
        if len(labels) != self.count:
            raise ApiError(
                400,
                f"{self.count} validation images but {len(labels)} validation labels; send "
                "one label per validation image",
            )
        # Whether each is of a class the request trains is the job queue's check (a 400).
        return [_checked_name(n, i, field="validation label") for i, n in enumerate(labels)]


def _read_files(paths: Sequence[Path]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]


def _with_status(ctx: bentoml.Context, answer: JSONResponse) -> Any:
    # BentoML gives an endpoint that takes `ctx` the status of `ctx.response`, whatever
    # the returned response says.
    ctx.response.status_code = answer.status_code
    return answer


def _checked_idempotency_key(values: Sequence[str]) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, "send one Idempotency-Key header, not several")
    if not IDEMPOTENCY_KEY.fullmatch(values[0]):
        raise ApiError(400, "Idempotency-Key must be 1 to 200 visible ASCII characters (no spaces)")
    return values[0]


def request_digest(
    samples: np.ndarray,
    names: Sequence[str],
    classes: Sequence[str],
    overrides: dict[str, Any] | None,
    validation: int = 0,
) -> str:
    """What makes two learn requests the same request for an Idempotency-Key: the decoded
    images (so /learn and /learn/upload of the same pixels agree), labels, class order,
    validated overrides and how many images are the validation set."""
    h = hashlib.sha256()
    head = {
        "shape": list(samples.shape),
        "labels": list(names),
        "classes": list(classes),
        "overrides": overrides or {},
        "validation": validation,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(np.ascontiguousarray(samples).tobytes())
    return h.hexdigest()


def _checked_name(name: object, i: int, field: str = "label") -> str:
    try:
        return validate_name(name)
    except InvalidInputError as e:
        raise ApiError(400, f"{field} {i}: {e}") from None


def _checked_classes(classes: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    """The registration order: the request's ``classes`` (each label exactly once), else the
    order of first appearance."""
    distinct = list(dict.fromkeys(names))
    if classes is None:
        return distinct
    order = [_checked_name(n, i, field="classes") for i, n in enumerate(classes)]
    if len(set(order)) != len(order):
        raise ApiError(400, "classes must list each class once")
    if set(order) != set(distinct):
        missing = sorted(set(distinct) - set(order))[:5]
        extra = sorted(set(order) - set(distinct))[:5]
        raise ApiError(
            400,
            "classes must be exactly the distinct labels"
            + (f"; not in classes: {missing}" if missing else "")
            + (f"; no image labelled {extra}" if extra else ""),
        )
    return order


def _checked_overrides(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    if not overrides:
        return None
    try:
        # Strict: "3" or true is a client's mistake, not an epoch count to coerce.
        parsed = JobOverrides.model_validate(overrides, strict=True)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ApiError(400, f"overrides: {problems}") from None
    return parsed.model_dump(exclude_none=True)


def openapi_document(service: Any) -> dict[str, Any]:
    """BentoML's OpenAPI document of the POST endpoints, plus the mounted GET routes, the
    bearer-token scheme and the error body of every refusal."""
    doc = service.openapi_spec.asdict()
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    paths = doc.setdefault("paths", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}

    error = {"description": "Refused; the body says why", "content": ref(ErrorBody)}
    for route_path, _, model, summary in GET_ROUTES:
        # Starlette's "{version:int}" is OpenAPI's "{version}" with an integer schema.
        params = re.findall(r"\{(\w+)(?::(\w+))?\}", route_path)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route_path)
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": "get_" + re.sub(r"[^a-z_]", "", path.strip("/").replace("/", "_")),
            "responses": {"200": {"description": "OK", "content": ref(model)}, "4XX": error},
        }
        if params:
            op["parameters"] = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer" if kind == "int" else "string"},
                }
                for name, kind in params
            ]
        paths[path] = {"get": op}
    for (method, path), route in GATEWAY_ROUTES.items():
        op = paths.get(path, {}).get(method.lower())
        if op is None:
            continue
        responses = op.setdefault("responses", {})
        if path.startswith("/learn") and 200 in responses:
            responses["202"] = {**responses.pop(200), "description": "Queued"}
        responses.update({"4XX": error, "503": error})
        if route.access != "open":
            op["security"] = [{"bearer": []}]
    return doc
