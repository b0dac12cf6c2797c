"""Server configuration, from environment variables (read once per process).

=============================  ===========  ================================================
variable                       default      meaning
=============================  ===========  ================================================
BSCE_API_TOKEN                 (unset)      bearer token for learn, rollback, pin, unpin;
                                            unset: those endpoints are open (a warning is
                                            logged at start)
BSCE_PREDICT_TOKEN             (unset)      bearer token for predict and the read endpoints
                                            (versions, classes, jobs); unset: open. The API
                                            token is accepted there too.
BSCE_WORKERS                   2            API worker processes (each holds its own model)
BSCE_DEVICE                    auto         torch device for inference: auto (CUDA when
                                            there is one, else CPU), cpu, cuda, cuda:1, ...
BSCE_PRECISION                 auto         inference arithmetic on CUDA: auto (bf16
                                            autocast where the GPU supports it), bf16,
                                            fp32; on CPU inference is fp32 whatever this
                                            says. The learner worker reads the same
                                            variable for training (--precision)
BSCE_TORCH_THREADS             cores/workers  intra-op threads per worker (CPU inference)
BSCE_TOP_K                     5            labels returned per image unless the request
                                            asks for another k
BSCE_MAX_TOP_K                 100          the largest k a request may ask for
BSCE_MAX_BATCH                 256          images per predict request
BSCE_MAX_LEARN_IMAGES          10000        images per learn request
BSCE_MAX_BODY_BYTES            33554432     request body limit (32 MiB); larger: 413
BSCE_MAX_INFLIGHT_BYTES        67108864     request body bytes one API worker holds at once
                                            (64 MiB, at least BSCE_MAX_BODY_BYTES); a body
                                            that would pass it: 503 with Retry-After
BSCE_MAX_IMAGE_PIXELS          4194304      pixels (width x height) per image; larger: 413
BSCE_BATCH_MAX_SIZE            64           adaptive batching: images per merged batch
BSCE_BATCH_MAX_LATENCY_MS      1000         adaptive batching: a single-image request that
                                            would wait longer is refused with 503
BSCE_POLL_INTERVAL_S           0.5          fallback check of the served version (besides
                                            the pub/sub announcements)
=============================  ===========  ================================================

Storage settings are the storage package's own: ``REDIS_URL`` (else the embedded Redis
under ``BSCE_DATA_HOME``), ``BSCE_PREFIX`` (key prefix) and ``BENTOML_HOME`` (model store); upload sessions read ``BSCE_SESSION_STORE``, ``BSCE_SESSION_TTL_S``,
``BSCE_SESSION_MAX_SAMPLES``, ``BSCE_SESSION_MAX_BYTES`` and ``BSCE_SESSION_CHUNK_BYTES``
(`storage.SessionSettings`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

ENV_PREFIX = "BSCE_"


def _default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    api_token: SecretStr | None = None
    predict_token: SecretStr | None = None
    workers: int = Field(2, ge=1, le=64)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    top_k: int = Field(5, ge=1)
    max_top_k: int = Field(100, ge=1)
    max_batch: int = Field(256, ge=1)
    max_learn_images: int = Field(10_000, ge=1)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_inflight_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(2048 * 2048, ge=1)
    batch_max_size: int = Field(64, ge=2)
    batch_max_latency_ms: int = Field(1000, ge=1)
    poll_interval_s: float = Field(0.5, gt=0, le=60)

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> Settings:
        # Else a lone request under the body limit would be refused as "busy" forever.
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError(
                "BSCE_MAX_INFLIGHT_BYTES must be at least BSCE_MAX_BODY_BYTES "
                f"({self.max_inflight_bytes} < {self.max_body_bytes})"
            )
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``BSCE_<FIELD>`` variables; empty values count as unset.

        Raises ``ValueError`` naming the variable when one does not parse.
        """
        env = os.environ if environ is None else environ
        raw = {
            name: env[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if env.get(ENV_PREFIX + name.upper(), "").strip()
        }
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            # A check across fields has no location; it names its variables in its message.
            where = ", ".join(
                ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else "the settings"
                for err in e.errors()
            )
            raise ValueError(f"bad server configuration in {where}: {e}") from None

    def threads(self) -> int:
        return self.torch_threads or _default_threads(self.workers)
