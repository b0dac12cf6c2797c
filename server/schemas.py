"""Request and response bodies of every endpoint (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from learner.core.overrides import JobOverrides
from storage import JobState, JobStatus, VersionInfo

Base64Image = Annotated[
    str,
    Field(
        description="A PNG, JPEG, WebP, BMP or GIF file, base64-encoded (a data: URL prefix is "
        "accepted)",
        examples=["iVBORw0KGgoAAAANSUhEUgAA..."],
    ),
]
ClassName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=100,
        description="Class name: printable, no leading or trailing whitespace",
        examples=["cat"],
    ),
]
TopK = Annotated[
    int | None,
    # Strict: `true` or "3" is a client's mistake, not a number to coerce. (A multipart
    # field arrives JSON-decoded by BentoML, so "3" there is the number 3.)
    Field(
        ge=1,
        strict=True,
        description="Labels per image, best first (default: the server's BSCE_TOP_K)",
    ),
]


class _Request(BaseModel):
    # Unknown fields are refused, so that a misspelt field does not go silently unused.
    model_config = ConfigDict(extra="forbid")


class _JsonRequest(_Request):
    # A JSON body's values are taken as typed: no `true` for 1, no "3" for 3.
    model_config = ConfigDict(extra="forbid", strict=True)


# -- predict -------------------------------------------------------------------------------


class PredictRequest(_JsonRequest):
    """One image or a batch. A request with one image goes through adaptive batching."""

    images: list[Base64Image] = Field(min_length=1, description="One or more images")
    top_k: TopK = None


class PredictUpload(_Request):
    """multipart/form-data: one or more ``files`` parts, optional ``top_k`` field."""

    files: list[Path] = Field(min_length=1, description="Image files (one part each)")
    top_k: TopK = None


class LabelScore(BaseModel):
    label: str
    index: int = Field(description="Class index in the label map (head row)")
    probability: float


class ImagePrediction(BaseModel):
    labels: list[LabelScore] = Field(description="Top-k labels, most probable first")


class PredictResponse(BaseModel):
    version: int = Field(description="The model version that answered")
    worker_pid: int = Field(description="The API worker process that answered")
    num_classes: int = Field(description="Classes the answering version can predict")
    predictions: list[ImagePrediction] = Field(description="One per image, in request order")


# -- learn ---------------------------------------------------------------------------------


# The OpenAPI document describes the overrides object field by field (the method as an enum
# of the registered methods); the server validates it with the same model (JobOverrides).
_OVERRIDES_SCHEMA: dict[str, Any] = {
    "properties": JobOverrides.model_json_schema()["properties"],
    "additionalProperties": False,
}


class LearnRequest(_JsonRequest):
    """Labelled images of one or more classes; one label per image."""

    images: list[Base64Image] = Field(min_length=1)
    labels: list[ClassName] = Field(min_length=1, description="One class name per image")
    classes: list[ClassName] | None = Field(
        None,
        description="Optional: the distinct labels, in the order new ones get their class "
        "index (default: order of first appearance in labels). Lets a client post samples "
        "in any order and still fix the head's row order",
    )
    overrides: dict[str, Any] | None = Field(
        None,
        description="Per-job training overrides the learner accepts (learner.core.overrides); "
        "``method`` is one of the registered methods",
        examples=[{"epochs": 2}],
        json_schema_extra=_OVERRIDES_SCHEMA,
    )
    validation_images: list[Base64Image] | None = Field(
        None,
        description="Optional: an explicit validation set, base64 like images. The promotion "
        "gate judges the classes it covers on these (never trained on) instead of holding "
        "out a tenth of their posted images; each must be of a class this request trains",
    )
    validation_labels: list[ClassName] | None = Field(
        None, description="One class name per validation image"
    )


class LearnUpload(_Request):
    """multipart/form-data: ``files`` parts and a ``labels`` field holding a JSON array of
    class names, one per file in order (``overrides``: an optional JSON object;
    ``validation_files`` and ``validation_labels``: an optional explicit validation set)."""

    files: list[Path] = Field(min_length=1)
    labels: list[ClassName] = Field(min_length=1)
    classes: list[ClassName] | None = None
    overrides: dict[str, Any] | None = Field(None, json_schema_extra=_OVERRIDES_SCHEMA)
    # A list with an empty default, not None: BentoML reads the parts of a Path list only.
    validation_files: list[Path] = Field(default_factory=list)
    validation_labels: list[ClassName] | None = None


# -- upload sessions (a job posted in batches; storage/sessions.py) -----------------------


class SessionOpen(_JsonRequest):
    """The classes a session's batches will hold, in the order new ones get their index."""

    classes: list[ClassName] = Field(
        min_length=1,
        description="Every class the session's samples belong to, each once; each needs at "
        "least one sample by the commit",
    )
    overrides: dict[str, Any] | None = Field(
        None,
        description="Per-job training overrides, as /learn's",
        json_schema_extra=_OVERRIDES_SCHEMA,
    )


class SessionBatch(_JsonRequest):
    """One batch of a session: as /learn's images and labels (any image size)."""

    images: list[Base64Image] = Field(min_length=1)
    labels: list[ClassName] = Field(min_length=1, description="One class name per image")
    expected_samples: int | None = Field(
        None,
        ge=0,
        description="Optional: the sample count the session should hold before this batch; "
        "another count is refused with 409 (so a retried batch is never stored twice)",
    )


class SessionStatus(BaseModel):
    session_id: str
    state: str = Field(description="open (takes batches) or committed (its job is queued)")
    expires_in_s: int | None = Field(description="Seconds before an untouched session is discarded")
    classes: list[str]
    counts: list[int] = Field(description="Samples per class, in classes order")
    num_samples: int
    num_chunks: int = Field(description="Stored chunks (bounded by BSCE_SESSION_CHUNK_BYTES)")
    bytes: int = Field(description="Decoded sample bytes stored")
    sample_shape: list[int] | None = Field(description="(C, H, W) of the stored samples")
    store: str = Field(description="Where the samples live: redis or dir")
    job_id: str | None = Field(None, description="The job the commit queued")


class SessionAborted(BaseModel):
    session_id: str
    aborted: bool = True


class JobAccepted(BaseModel):
    job_id: str
    state: JobState = Field(
        "queued", description="queued for a new job; the job's state now for a replay"
    )
    replayed: bool = Field(
        False,
        description="True when an earlier request with the same Idempotency-Key and body "
        "made this job (answered 200; nothing new was queued)",
    )
    status_url: str
    num_samples: int = Field(description="Images stored with the job, validation included")
    validation: int = Field(
        0, description="Of num_samples, the explicit validation set's (never trained on)"
    )
    classes: list[str] = Field(
        description="Classes in this job, in the order they were registered (the request's "
        "classes, else order of first appearance)"
    )
    new_classes: list[str] = Field(description="Classes the label map did not know before")


class JobStatusResponse(JobStatus):
    served: bool | None = Field(
        None, description="For a done job: whether its version is the one served now"
    )


class JobList(BaseModel):
    jobs: list[JobStatusResponse]


# -- versions and classes ------------------------------------------------------------------


class VersionList(BaseModel):
    current: int | None
    pinned: int | None
    history: list[int] = Field(description="Earlier served versions, newest first")
    versions: list[VersionInfo]


class VersionDetail(BaseModel):
    """One version: its registry entry and what the learner recorded with it."""

    info: VersionInfo
    config: dict[str, Any] | None = Field(
        None, description="The learner's step config (pydantic StepConfig as JSON)"
    )
    seed: int | None = Field(None, description="The learner worker's --seed")
    rng: str | None = Field(
        None,
        description="Where the step's random stream came from: 'seed' (version 0), "
        "'parent' (continued from the parent version's saved stream), 'seed+version' (a "
        "fresh one, when the parent was written before streams were saved)",
    )
    parent_version: int | None = None
    step: int | None = None
    active_classes: list[bool] | None = None
    report: dict[str, Any] | None = Field(
        None, description="The training step's report: losses, timings, images/s"
    )
    machine: dict[str, Any] | None = Field(None, description="Where the learner trained it")
    gate: dict[str, Any] | None = Field(
        None,
        description="The promotion gate's report (learner.core.gate.GateReport): held-out "
        "accuracy per class for this version and its parent, old/new means, the verdict "
        "and its reasons; null when saved without the gate",
    )
    rejected_when_cut: dict[str, Any] | None = Field(
        None,
        description="The first try of a job whose training the worker's time bound cut short "
        "and the gate rejected (optimizer_steps, planned_steps, train_seconds, gate_reasons): "
        "this version is the second try, trained without the bound; null otherwise",
    )


class WorkerVersion(BaseModel):
    worker_pid: int
    version: int | None = Field(description="The version this worker has loaded")


class CurrentVersion(BaseModel):
    version: int | None = Field(description="The version the pointer names (served by all)")
    pinned: int | None
    info: VersionInfo | None
    worker: WorkerVersion


class PinRequest(_JsonRequest):
    version: int = Field(ge=0)


class PointerChange(BaseModel):
    current: int | None
    pinned: int | None
    previous: int | None = Field(description="The version served before this change")


class ClassInfo(BaseModel):
    index: int
    name: str
    count: int = Field(description="Samples of this class the version was trained on last")
    exemplars: int = Field(description="Exemplars of this class in the replay memory")


class ClassList(BaseModel):
    version: int | None
    classes: list[ClassInfo] = Field(description="Classes the current version predicts")
    pending: list[str] = Field(
        description="Names in the label map that the current version does not predict "
        "(queued, being learned, or rolled back)"
    )


# -- health and errors ---------------------------------------------------------------------


class DegradedState(BaseModel):
    wanted: int = Field(description="The version the pointer names, which does not load")
    served: int | None = Field(description="The fallback this worker serves instead")
    error: str = Field(description="Why the wanted version does not load")


class Health(BaseModel):
    ready: bool
    model_loaded: bool
    store_reachable: bool
    version: int | None = Field(description="The version this worker serves")
    pointer: int | None = Field(description="The version the storage pointer names")
    worker_pid: int
    degraded: DegradedState | None = Field(
        None,
        description="Set while this worker serves a fallback (the newest loadable version "
        "of the pointer's lineage) because the pointer's version does not load; it is "
        "retried on every poll. Still ready.",
    )
    detail: str | None = Field(None, description="Why not ready, or the last failed load")
    model_memory: dict[str, Any] | None = Field(
        None,
        description="Bytes of the served version, of a version being loaded beside it and "
        "their sum at the last swap; on CUDA, what torch's allocator holds (server/holder.py)",
    )


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, in one sentence")
    detail: list[dict[str, Any]] | None = None
