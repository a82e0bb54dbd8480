"""The HTTP routes users call: the page, /predict, /feedback and /model.

They are a Starlette app mounted on the BentoML service, which gives them full control of
multipart parsing, size limits and error bodies; the model runs in the service's adaptive
batcher, so concurrent requests share forward passes.
"""

import hmac
import logging
import os
import uuid
from collections import OrderedDict
from importlib.resources import files
from typing import Any, Protocol

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from medical_ct.preprocessing import InvalidImageError, preprocess_image
from medical_ct.serving import metrics
from medical_ct.serving.batching import OverloadedError
from medical_ct.serving.feedback import FeedbackStore, FeedbackStoreError
from medical_ct.serving.model_holder import ModelHolder

logger = logging.getLogger(__name__)

FEEDBACK_TOKEN_VARIABLE = "MEDICAL_CT_FEEDBACK_TOKEN"
NO_MODEL_MESSAGE = (
    "no champion model is registered yet: train one with `make run`; "
    "the service picks it up without a restart"
)
_REMEMBERED_PREDICTIONS = 10_000


class ServiceState(Protocol):
    """What the routes need from the BentoML service instance."""

    holder: ModelHolder
    feedback_store: FeedbackStore
    max_upload_bytes: int
    recent_predictions: "RecentPredictions"

    async def classify_pixels(self, pixels: np.ndarray) -> dict[str, Any]: ...


class RecentPredictions:
    """The last predictions by id, so feedback can record what it corrected."""

    def __init__(self, size: int = _REMEMBERED_PREDICTIONS) -> None:
        self._size = size
        self._items: OrderedDict[str, dict[str, str]] = OrderedDict()

    def add(self, prediction_id: str, model_version: str, label: str) -> None:
        self._items[prediction_id] = {"model_version": model_version, "label": label}
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def get(self, prediction_id: str) -> dict[str, str] | None:
        return self._items.get(prediction_id)


def error(status: int, message: str, **details: Any) -> JSONResponse:
    return JSONResponse({"error": message, **details}, status_code=status)


def _service() -> ServiceState:
    import bentoml

    return bentoml.get_current_service()


async def _read_form(request: Request, limit: int):
    """The multipart form, refusing bodies over ``limit`` bytes before reading them whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is {int(declared):,} bytes; the limit is {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the upload is over the limit of {limit:,} bytes")
    if not body:
        raise HTTPException(400, "the request body is empty: send a multipart form")
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            415, f"send multipart/form-data with an 'image' file field, not {content_type!r}"
        )
    request._body = bytes(body)  # Starlette's form parser reads the cached body
    return await request.form(max_files=2, max_fields=10)


async def _image_field(form) -> bytes:
    image = form.get("image")
    if image is None:
        raise HTTPException(400, "the multipart field 'image' is missing")
    if not isinstance(image, UploadFile):
        raise HTTPException(400, "the field 'image' must be a file upload")
    return await image.read()


async def _preprocess(data: bytes) -> np.ndarray:
    try:
        return await anyio.to_thread.run_sync(preprocess_image, data)
    except InvalidImageError as invalid:
        raise HTTPException(422, f"the image cannot be classified: {invalid}") from None


async def predict(request: Request) -> Response:
    """``POST /predict``: multipart ``image`` -> label, confidence, probabilities."""
    service = _service()
    if service.holder.current is None:
        return error(503, NO_MODEL_MESSAGE)
    form = await _read_form(request, service.max_upload_bytes)
    pixels = await _preprocess(await _image_field(form))
    try:
        result = await service.classify_pixels(pixels)
    except OverloadedError as overloaded:
        return error(503, str(overloaded))
    prediction_id = uuid.uuid4().hex
    service.recent_predictions.add(prediction_id, result["model_version"], result["label"])
    metrics.predictions_total.labels(label=result["label"]).inc()
    return JSONResponse({**result, "prediction_id": prediction_id})


def _authorized(request: Request) -> bool:
    token = os.environ.get(FEEDBACK_TOKEN_VARIABLE)
    if not token:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def feedback(request: Request) -> Response:
    """``POST /feedback``: ``image``, ``label``, optional ``prediction_id`` -> 201 and an id."""
    service = _service()
    if not _authorized(request):
        return JSONResponse(
            {"error": "feedback needs the header 'Authorization: Bearer <token>'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    served = service.holder.current
    if served is None:
        return error(503, NO_MODEL_MESSAGE)
    form = await _read_form(request, service.max_upload_bytes)
    label = form.get("label")
    if not isinstance(label, str) or not label:
        raise HTTPException(400, "the multipart field 'label' (a class name) is missing")
    if label not in served.class_names:
        return error(
            422,
            f"unknown label {label!r}: use one of {', '.join(served.class_names)}",
            valid_labels=served.class_names,
        )
    image = await _image_field(form)
    await _preprocess(image)  # only images the training pipeline can decode are stored
    prediction_id = form.get("prediction_id") or None
    corrected = service.recent_predictions.get(prediction_id) if prediction_id else None
    record = {
        "prediction_id": prediction_id,
        "corrected_model_version": corrected["model_version"] if corrected else None,
        "corrected_label": corrected["label"] if corrected else None,
        "serving_model_version": served.version,
    }
    try:
        receipt = await anyio.to_thread.run_sync(service.feedback_store.save, image, label, record)
    except FeedbackStoreError as failure:
        logger.error("Feedback not stored: %s", failure.__cause__)
        return error(503, f"{failure}; nothing was stored, try again later")
    metrics.feedback_total.labels(label=label).inc()
    return JSONResponse(
        {"feedback_id": receipt.feedback_id, "stored_as": receipt.stored_as, "label": label},
        status_code=201,
    )


async def model_info(_: Request) -> Response:
    """``GET /model``: the serving version, its classes and test metrics."""
    served = _service().holder.current
    if served is None:
        return error(503, NO_MODEL_MESSAGE)
    return JSONResponse(served.describe())


async def page(_: Request) -> Response:
    """``GET /``: the upload page (self-contained HTML, works offline)."""
    return HTMLResponse(files("medical_ct.serving").joinpath("page.html").read_text())


async def _http_error(_: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail)


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/model", model_info, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
