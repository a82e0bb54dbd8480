"""The BentoML service: `bentoml serve` (or `make serve`) from the project root.

Serves the registry's champion (``medical_ct_classifier@champion``) from the MLflow store the
pipelines use. ``/predict`` and ``/feedback`` are BentoML APIs (``/docs`` shows them); the
logic behind them lives in ``medical_ct.serving``.
"""

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import bentoml
import numpy as np
from bentoml.validators import ContentType
from pydantic import BeforeValidator

from medical_ct.preprocessing import InvalidImageError, content_hash, preprocess_image
from medical_ct.serving import metrics
from medical_ct.serving.batching import AdaptiveBatcher, OverloadedError
from medical_ct.serving.http import (
    FEEDBACK_TOKEN_VARIABLE,
    NO_MODEL_MESSAGE,
    BearerTokenGuard,
    ReviewerGuard,
    ServiceError,
    UploadGuard,
    answers_errors,
    explain_dicom_upload,
    pages,
)
from medical_ct.serving.model_holder import InvalidModelOutputError, ModelHolder, ServedModel
from medical_ct.serving.ood import check_builder
from medical_ct.serving.packaging import load_packaged, packaged_model
from medical_ct.serving.prediction_log import PREDICTION_LOG, PredictionLog, new_prediction_id
from medical_ct.serving.project import (
    load_project,
    project_path,
    refuse_state_inside_bento,
    use_tracking_uri,
)
from medical_ct.serving.review import (
    ReviewError,
    ReviewQueue,
    StoreError,
    reviewer_of,
    reviewer_tokens,
)
from medical_ct.serving.schemas import (
    CorrectedPrediction,
    FeedbackReceipt,
    Prediction,
    ReviewDecision,
    Revocation,
)
from medical_ct.serving.worker import freeze_startup_heap, share_cores

logger = logging.getLogger(__name__)
# Kedro resolves the catalog's relative paths (data/...) and the sqlite store against the
# working directory, as for `kedro run`: the service moves to the project root once, here.
os.chdir(project_path())
project = load_project()
refuse_state_inside_bento(project)  # a Bento is no place for patient data nor the registry
serving = project.serving
PACKAGED_MODEL = packaged_model()
# BeforeValidator runs before ContentType: a DICOM sent as application/dicom is named as such
Image = Annotated[Path, ContentType("image/*"), BeforeValidator(explain_dicom_upload)]


@bentoml.asgi_app(pages(), path="/")
@bentoml.service(name="medical_ct", traffic={"timeout": 60}, workers=serving.workers)
class MedicalCT:
    # Declared so that `bentoml build` ships it (see `make bento`); None when not imported.
    packaged_model = PACKAGED_MODEL

    def __init__(self) -> None:
        share_cores(serving.workers)  # each worker's share, for torch's and numpy's pools
        use_tracking_uri(project.tracking_uri)
        self.prediction_log = PredictionLog(
            project.catalog.get(PREDICTION_LOG),
            serving.prediction_log_flush_interval_s,
            serving.log_pixels,
            serving.prediction_log_enabled,
        )
        review = project.review  # conf/base/review.yml: its out_of_distribution section
        self.holder = ModelHolder(
            ood_check=check_builder(
                project.catalog,
                review.ood_reference_images_per_class,
                review.ood_max_distance_ratio,
            )
        )
        if not self.holder.refresh() and PACKAGED_MODEL is not None:
            logger.info("No champion reachable in the registry: serving the packaged model")
            self.holder.set(load_packaged(self.packaged_model))
        if self.holder.current is None:
            logger.warning(NO_MODEL_MESSAGE)
        self.holder.start_polling(serving.model_poll_interval_s)
        self.batcher = AdaptiveBatcher(
            self.holder.classify, serving.max_batch_size, serving.max_latency_ms
        )
        reviewer_tokens()  # a malformed MEDICAL_CT_REVIEWER_TOKENS stops the start, saying why
        self.reviews = ReviewQueue(project.catalog, project.review)
        self.reviews.watch()
        freeze_startup_heap()  # last: what start-up built is never walked by the collector

    def __is_ready__(self) -> bool:
        return self.holder.current is not None

    @bentoml.api(route="/predict")
    @answers_errors
    async def predict(self, image: Image, ctx: bentoml.Context) -> Prediction:
        """Classify one image (multipart field `image`, any format Pillow reads)."""
        self._served()
        pixels = await _preprocess(image.read_bytes())
        try:
            result = await self.batcher.submit(pixels)
        except OverloadedError as overloaded:
            raise ServiceError(503, str(overloaded)) from None
        except InvalidModelOutputError as invalid:
            raise ServiceError(500, str(invalid)) from None
        prediction_id = new_prediction_id()
        self.prediction_log.append(prediction_id, result, pixels)
        metrics.predictions_total.labels(label=result["label"]).inc()
        metrics.prediction_confidence.observe(result["confidence"])
        metrics.needs_review_total.inc(result["needs_review"])
        metrics.out_of_distribution_total.inc(result["out_of_distribution"])
        return Prediction(**result, prediction_id=prediction_id)

    @bentoml.api(route="/feedback")
    @answers_errors
    async def feedback(
        self, image: Image, label: str, ctx: bentoml.Context, prediction_id: str | None = None
    ) -> FeedbackReceipt:
        """Send the correct `label` of an image, with the `prediction_id` it corrects if known.

        Answers 202: the item waits for a reviewer (GET /review), and only accepted feedback
        is trained on. Needs `Authorization: Bearer <token>` when the service has a feedback
        token; 429 with Retry-After past the burst limit of conf/base/review.yml.
        """
        served = self._served()
        _check_label(served, label)
        data = image.read_bytes()
        pixels = await _preprocess(data)  # only images the training pipeline decodes are stored
        logged = None
        if prediction_id:
            logged = await anyio.to_thread.run_sync(self.prediction_log.find, prediction_id)
        if logged and logged.get("pixel_hash") not in (None, content_hash(pixels)):
            # The reviewer would see what another image was called as what this one corrects.
            raise ServiceError(
                422,
                f"prediction {prediction_id} classified another image: send the image it "
                "classified with it, or leave prediction_id out",
            )
        corrected = (
            CorrectedPrediction(model_version=logged["model_version"], label=logged["label"])
            if logged
            else None
        )
        submitter = ctx.request.client.host if ctx.request.client else "unknown"
        record = {
            "prediction_id": prediction_id,
            "corrected_model_version": corrected.model_version if corrected else None,
            "corrected_label": corrected.label if corrected else None,
            "serving_model_version": served.version,
            "submitter": submitter,
        }
        try:
            stored, status = await anyio.to_thread.run_sync(
                self.reviews.submit, data, pixels, label, record, served
            )
        except ReviewError as refused:  # past the burst limit
            raise ServiceError(
                refused.status, str(refused), {"Retry-After": str(refused.retry_after_s)}
            ) from None
        except StoreError as failure:
            logger.error("Feedback not stored: %s", failure.__cause__)
            raise ServiceError(503, f"{failure}; nothing was stored, try again later") from None
        metrics.feedback_total.labels(label=label).inc()
        ctx.response.status_code = 202
        return FeedbackReceipt(
            feedback_id=stored["feedback_id"],
            stored_as=stored["image"],
            label=label,
            corrected=corrected,
            status=status,
            message=f"received, {'waiting for review' if status == 'pending' else status}",
        )

    @bentoml.api(route="/review")
    @answers_errors
    async def review(
        self,
        feedback_id: str,
        decision: Literal["accept", "reject"],
        ctx: bentoml.Context,
        label: str | None = None,
    ) -> ReviewDecision:
        """Accept (optionally under a corrected `label`) or reject a pending feedback item.

        Needs a reviewer's `Authorization: Bearer <token>` (MEDICAL_CT_REVIEWER_TOKENS).
        404 for an unknown id, 422 for a label that is not a class, 409 once decided.
        """
        served = self._served()
        if label is not None:
            _check_label(served, label)
        reviewer = reviewer_of(ctx.request.headers.get("authorization", ""))
        try:
            record = await anyio.to_thread.run_sync(
                self.reviews.decide, feedback_id, decision, reviewer, label
            )
        except ReviewError as refused:
            raise ServiceError(refused.status, str(refused)) from None
        except StoreError as failure:
            raise ServiceError(503, f"{failure}; nothing was decided, try again") from None
        return ReviewDecision(**{key: record[key] for key in ReviewDecision.model_fields})

    @bentoml.api(route="/review/revoke")
    @answers_errors
    async def revoke(self, feedback_id: str, reason: str, ctx: bentoml.Context) -> Revocation:
        """Take an accepted label back from training (a label accepted by mistake, e.g. the
        batch a rollback was for): the next `data_processing` leaves its image out.

        Needs a reviewer's token, as `POST /review`; the revocation, who and why, is audited.
        422 without a reason, 404 for an unknown id, 409 unless accepted, or once revoked.
        """
        reviewer = reviewer_of(ctx.request.headers.get("authorization", ""))
        try:
            record = await anyio.to_thread.run_sync(
                self.reviews.store.revoke, feedback_id, reviewer, reason
            )
        except ReviewError as refused:
            raise ServiceError(refused.status, str(refused)) from None
        except StoreError as failure:
            raise ServiceError(503, f"{failure}; nothing was revoked, try again") from None
        return Revocation(**{key: record[key] for key in Revocation.model_fields})

    def review_queue(self, limit: int) -> list[dict[str, Any]]:
        """``GET /review``: pending items, oldest first, with the champion's view and flags."""
        return self.reviews.queue(self._served(), limit)

    def review_image(self, feedback_id: str) -> bytes:
        """``GET /review/image?feedback_id=<id>``: the submitted image, as it was sent."""
        try:
            return self.reviews.store.image(feedback_id)
        except ReviewError as refused:
            raise ServiceError(refused.status, str(refused)) from None

    def model_info(self) -> dict[str, Any]:
        """``GET /model``: the serving version, its classes and test metrics."""
        return self._served().describe()

    def _served(self) -> ServedModel:
        served = self.holder.current
        if served is None:
            raise ServiceError(503, NO_MODEL_MESSAGE)
        return served

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.holder.stop()
        self.reviews.stop()
        self.prediction_log.close()


def _check_label(served: ServedModel, label: str) -> None:
    if label not in served.class_names:
        raise ServiceError(
            422,
            f"unknown label {label!r}: use one of {', '.join(served.class_names)}",
            valid_labels=served.class_names,
        )


async def _preprocess(data: bytes) -> np.ndarray:
    try:
        return await anyio.to_thread.run_sync(preprocess_image, data)
    except InvalidImageError as invalid:
        raise ServiceError(422, f"the image cannot be classified: {invalid}") from None


MedicalCT.add_asgi_middleware(
    BearerTokenGuard, routes={"/feedback"}, variable=FEEDBACK_TOKEN_VARIABLE
)
MedicalCT.add_asgi_middleware(ReviewerGuard)
MedicalCT.add_asgi_middleware(
    UploadGuard,
    uploads={"/predict": {"image"}, "/feedback": {"image"}},
    limit=serving.max_upload_bytes,
)
