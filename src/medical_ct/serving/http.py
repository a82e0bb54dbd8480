"""What the service's BentoML APIs need around them over HTTP: guards, errors and the pages.

``/predict`` and ``/feedback`` are ``@bentoml.api`` methods of ``service.MedicalCT``, so they are
in BentoML's OpenAPI (``/docs.json``, the Swagger page at ``/docs``) and work with
``bentoml.SyncHTTPClient``. Two ASGI middlewares answer before BentoML parses a request:
``BearerTokenGuard`` (401 without the feedback token, before the body is read) and
``UploadGuard`` (413 before an oversized body is read, 415 for a body that is not multipart,
400 for an empty one or for text, such as a URL, where a file belongs: BentoML would fetch a
URL given in place of a file). The page (``/``), ``GET /model`` and ``/docs`` are a small
Starlette app mounted beside the APIs.
"""

import fnmatch
import functools
import hmac
import io
import os
from collections.abc import Awaitable, Callable, Collection
from importlib.resources import files
from typing import Any

import bentoml
from anyio.to_thread import run_sync
from PIL import Image as PILImage
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medical_ct.preprocessing import DICOM_HEAD_BYTES, DICOM_MESSAGE, is_dicom
from medical_ct.serving.review import REVIEWER_TOKENS_VARIABLE, reviewer_of, reviewer_tokens

FEEDBACK_TOKEN_VARIABLE = "MEDICAL_CT_FEEDBACK_TOKEN"
_MAX_PARTS = 10  # the APIs take at most 3 fields
NO_MODEL_MESSAGE = (
    "no champion model is registered yet: train one with `make run`; "
    "the service picks it up without a restart"
)


class ServiceError(Exception):
    """A request the service answers with ``status`` and ``{"error": message, **details}``."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **details: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"error": message, **details}


def answers_errors(api: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn a ``ServiceError`` raised by an API method into its status code and JSON body.

    BentoML maps its own exceptions to a status but hides the message of every 5xx, and our
    503s (no model yet, overloaded, store down) must say what to do. The method takes
    ``ctx: bentoml.Context``: BentoML sets the response's status from it.
    """

    @functools.wraps(api)
    async def wrapper(*args: Any, ctx: bentoml.Context, **kwargs: Any) -> Any:
        try:
            return await api(*args, ctx=ctx, **kwargs)
        except ServiceError as failure:
            ctx.response.status_code = failure.status
            return JSONResponse(failure.body, status_code=failure.status, headers=failure.headers)

    return wrapper


async def _answer(send: Send, status: int, message: str, headers: dict | None = None) -> None:
    response = JSONResponse({"error": message}, status_code=status, headers=headers)
    await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class BearerTokenGuard:
    """401 for a POST to ``routes`` without ``Authorization: Bearer $<variable>``.

    No token set means no check (a deployment behind its own authentication). Answered before
    the body is read; the token is compared in constant time and never logged.
    """

    def __init__(self, app: ASGIApp, routes: Collection[str], variable: str) -> None:
        self.app = app
        self.routes = frozenset(routes)
        self.variable = variable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = os.environ.get(self.variable)
        if token and scope["type"] == "http" and scope["path"] in self.routes:
            given = Headers(scope=scope).get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                await _answer(
                    send,
                    401,
                    f"{scope['path']} needs the header 'Authorization: Bearer <token>'",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        await self.app(scope, receive, send)


class ReviewerGuard:
    """Requests to ``/review`` and below need a reviewer's token (``$MEDICAL_CT_REVIEWER_TOKENS``).

    401 without a known token, 403 for the feedback token (a submitter may not review what
    they submitted) and 403 when no reviewer is configured: review is never open to anyone.
    Answered before the body is read; tokens are compared in constant time, never logged.
    """

    def __init__(self, app: ASGIApp, prefix: str = "/review") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == self.prefix or path.startswith(self.prefix + "/"):
            refusal = _reviewer_refusal(Headers(scope=scope).get("authorization", ""))
            if refusal is not None:
                await _answer(send, *refusal)
                return
        await self.app(scope, receive, send)


def _reviewer_refusal(authorization: str) -> tuple[int, str, dict] | None:
    if not reviewer_tokens():
        return 403, f"review is disabled: set {REVIEWER_TOKENS_VARIABLE}=name:token,...", {}
    if reviewer_of(authorization) is not None:
        return None
    feedback_token = os.environ.get(FEEDBACK_TOKEN_VARIABLE)
    given = authorization.removeprefix("Bearer ").encode()
    if feedback_token and hmac.compare_digest(given, feedback_token.encode()):
        return 403, "the feedback token can submit feedback, not review it", {}
    challenge = {"WWW-Authenticate": "Bearer"}
    return 401, "review needs the header 'Authorization: Bearer <reviewer token>'", challenge


class UploadGuard:
    """Checks a POST to ``uploads`` (route -> its file fields) before BentoML parses it."""

    def __init__(self, app: ASGIApp, uploads: dict[str, Collection[str]], limit: int) -> None:
        self.app = app
        self.uploads = uploads
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = self.uploads.get(scope["path"]) if scope["type"] == "http" else None
        if fields is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._checked_body(Headers(scope=scope), receive, fields)
        except ServiceError as refused:
            await _answer(send, refused.status, refused.body["error"])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _checked_body(self, headers: Headers, receive: Receive, fields) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            raise ServiceError(
                413, f"the upload is {int(declared):,} bytes; the limit is {self.limit:,}"
            )
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.limit:
                raise ServiceError(413, f"the upload is over the limit of {self.limit:,} bytes")
            if not message.get("more_body", False):
                break
        if not body:
            raise ServiceError(400, "the request body is empty: send a multipart form")
        content_type, options = parse_options_header(headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not options.get(b"boundary"):
            raise ServiceError(
                415,
                f"send multipart/form-data with an 'image' file field, "
                f"not {headers.get('content-type', 'no content type')!r}",
            )
        _check_file_fields(bytes(body), options[b"boundary"], fields)
        return bytes(body)


def _check_file_fields(body: bytes, boundary: bytes, fields: Collection[str]) -> None:
    """Each file field is there, as a file: BentoML would fetch a URL sent as text there."""
    missing = set(fields)
    parts = body.split(b"--" + boundary)
    if len(parts) > _MAX_PARTS + 2:  # the preamble and the closing "--" are not parts
        raise ServiceError(400, f"the form has {len(parts) - 2} parts; at most {_MAX_PARTS}")
    for part in parts:
        head = part.partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() != b"content-disposition":
                continue
            _, options = parse_options_header(value.strip())
            field = options.get(b"name", b"").decode(errors="replace")
            missing.discard(field)
            if field in fields and b"filename" not in options:
                raise ServiceError(
                    400,
                    f"the field {field!r} must be a file upload, not text "
                    f"(a URL is not fetched: send the image itself)",
                )
    if missing:
        raise ServiceError(400, f"the multipart field {sorted(missing)[0]!r} (a file) is missing")


def explain_dicom_upload(upload: Any) -> Any:
    """A pydantic ``BeforeValidator`` for an image upload, placed after BentoML's
    ``ContentType("image/*")`` in its ``Annotated`` (so it runs first): a DICOM file sent with
    a type that is not an image (``application/dicom``, or ``application/octet-stream``, what
    curl sends for a .dcm) is refused saying it is DICOM and how to send a PNG, in BentoML's
    own 400 "validation error" answer, where BentoML said only "Invalid content type
    application/dicom, expected image/*". Anything else passes unchanged."""
    content_type = getattr(upload, "content_type", None)
    file = getattr(upload, "file", None)
    if content_type is None or file is None or fnmatch.fnmatch(content_type, "image/*"):
        return upload  # an image type: the preprocessing names DICOM sent as image/dicom
    if "dicom" in content_type.lower():
        raise ValueError(DICOM_MESSAGE)
    start = file.tell()
    head = file.read(DICOM_HEAD_BYTES)
    file.seek(start)
    if is_dicom(head):
        raise ValueError(DICOM_MESSAGE)
    return upload


def pages() -> Starlette:
    """``GET /`` (the upload page), ``GET /model`` and ``GET /docs`` (BentoML's Swagger UI).

    BentoML serves its Swagger UI at ``/``, where users of this service find the page; the
    same UI is served at ``/docs`` from BentoML's own ``/static_content`` and ``/docs.json``,
    without the analytics tag of BentoML's index page (the service must work offline).
    """

    async def page(_: Request) -> Response:
        return HTMLResponse(files("medical_ct.serving").joinpath("page.html").read_text())

    async def swagger(_: Request) -> Response:
        return HTMLResponse(files("medical_ct.serving").joinpath("docs.html").read_text())

    async def model(_: Request) -> Response:
        return await _json(lambda service: service.model_info())

    async def review(request: Request) -> Response:
        limit = request.query_params.get("limit", "50")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 500:  # not "²"
            return JSONResponse({"error": "limit is a number from 1 to 500"}, status_code=400)
        return await _json(lambda service: service.review_queue(int(limit)))

    async def review_image(request: Request) -> Response:
        # The id is a query parameter, not part of the path: BentoML's request metrics label
        # each path, and /review/image/<id> made a set of series for every image ever shown.
        feedback_id = request.query_params.get("feedback_id", "")
        service = bentoml.get_current_service()
        try:
            data = await run_sync(service.review_image, feedback_id)
        except ServiceError as failure:
            return JSONResponse(failure.body, status_code=failure.status)
        headers = {"Cache-Control": "private, max-age=3600"}
        return Response(data, media_type=_media_type(data), headers=headers)

    return Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/docs", swagger, methods=["GET"]),
            Route("/model", model, methods=["GET"]),
            Route("/review", review, methods=["GET"]),
            Route("/review/image", review_image, methods=["GET"]),
        ]
    )


def _media_type(image: bytes) -> str:
    """The image's type by its content; bytes that no longer decode (flagged
    ``image_unreadable`` in the queue) are sent as they are, where they answered 500."""
    try:
        with PILImage.open(io.BytesIO(image)) as opened:
            return PILImage.MIME.get(opened.format or "", "application/octet-stream")
    except Exception:  # Pillow raises several kinds on broken headers
        return "application/octet-stream"


async def _json(answer: Callable[[Any], Any]) -> Response:
    """``answer(service)``, run in a thread (it may read stores), as JSON or its error."""
    service = bentoml.get_current_service()
    try:
        return JSONResponse(await run_sync(answer, service))
    except ServiceError as failure:
        return JSONResponse(failure.body, status_code=failure.status)
