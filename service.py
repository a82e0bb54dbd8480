"""The BentoML service: `bentoml serve` (or `make serve`) from the project root.

Serves the registry's champion (``medical_ct_classifier@champion``) from the MLflow store the
pipelines use; the routes users call live in ``medical_ct.serving.http``.
"""

import logging
from typing import Any

import bentoml
import numpy as np

from medical_ct.serving import metrics
from medical_ct.serving.batching import AdaptiveBatcher
from medical_ct.serving.feedback import FeedbackStore
from medical_ct.serving.http import NO_MODEL_MESSAGE, RecentPredictions, create_app
from medical_ct.serving.model_holder import ModelHolder
from medical_ct.serving.packaging import load_packaged, packaged_model
from medical_ct.serving.project import load_project, use_tracking_uri

logger = logging.getLogger(__name__)
project = load_project()
serving = project.serving
PACKAGED_MODEL = packaged_model()


@bentoml.asgi_app(create_app(), path="/")
@bentoml.service(name="medical_ct", traffic={"timeout": 60}, workers=1)
class MedicalCT:
    # Declared so that `bentoml build` ships it (see `make bento`); None when not imported.
    packaged_model = PACKAGED_MODEL

    def __init__(self) -> None:
        use_tracking_uri(project.tracking_uri)
        self.max_upload_bytes = serving.max_upload_bytes
        self.feedback_store = FeedbackStore(project.catalog)
        self.recent_predictions = RecentPredictions()
        self.holder = ModelHolder()
        if not self.holder.refresh() and PACKAGED_MODEL is not None:
            logger.info("No champion reachable in the registry: serving the packaged model")
            self.holder.set(load_packaged(self.packaged_model))
        if self.holder.current is None:
            logger.warning(NO_MODEL_MESSAGE)
        self.holder.start_polling(serving.model_poll_interval_s)
        self.batcher = AdaptiveBatcher(
            self.classify, serving.max_batch_size, serving.max_latency_ms
        )

    def __is_ready__(self) -> bool:
        return self.holder.current is not None

    def classify(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Preprocessed ``(n, 64, 64)`` uint8 images -> one prediction each, by one model."""
        served = self.holder.current
        if served is None:
            raise RuntimeError(NO_MODEL_MESSAGE)
        metrics.batch_size.observe(len(images))
        return served.classify(images)

    async def classify_pixels(self, pixels: np.ndarray) -> dict[str, Any]:
        """One image through ``classify``, batched with whatever else is in flight."""
        return await self.batcher.submit(pixels)

    @bentoml.on_shutdown
    def stop_polling(self) -> None:
        self.holder.stop()
