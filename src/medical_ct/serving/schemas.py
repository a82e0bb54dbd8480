"""The typed answers of the service's APIs: BentoML's OpenAPI (``/docs.json``) shows them."""

from typing import Literal

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    """The answer of ``POST /predict``."""

    label: str = Field(description="the most probable class")
    confidence: float = Field(description="the calibrated probability of `label`")
    needs_review: bool = Field(
        description="true when `confidence` is under the model's review threshold (GET /model) "
        "or the image is `out_of_distribution`: the answer is uncertain and a person should "
        "check it"
    )
    out_of_distribution: bool = Field(
        description="true when the image is unlike the images the model was trained on (far "
        "from them in the model's features, or one flat grey): a model answers such an image "
        "as confidently as any, so its `confidence` says nothing"
    )
    out_of_distribution_ratio: float | None = Field(
        description="the image's distance to the nearest class of the training images, in "
        "their own 99th percentile; out of distribution past conf/base/review.yml's "
        "max_distance_ratio; null without a reference (too few raw images)"
    )
    probabilities: dict[str, float] = Field(description="the probability of every class")
    model_version: str = Field(description="the registered version that answered")
    prediction_id: str = Field(
        description="send it with a correction to POST /feedback, from any replica, any time"
    )


class CorrectedPrediction(BaseModel):
    """What a feedback corrected, found in the prediction log by its ``prediction_id``."""

    model_version: str
    label: str


class FeedbackReceipt(BaseModel):
    """The answer of ``POST /feedback`` (status 202: received, waiting for review)."""

    feedback_id: str = Field(description="the same image and label always get the same id")
    stored_as: str = Field(description="<label>/<sha256 of the file>.<format> in the store")
    label: str
    corrected: CorrectedPrediction | None = Field(
        description="the prediction this feedback corrected; null when no prediction_id was "
        "sent or the prediction log has no such id"
    )
    status: Literal["pending", "accepted", "rejected"] = Field(
        description="pending until a reviewer decides (only accepted feedback is trained on); "
        "a repeat of an item already decided says how it was decided"
    )
    message: str


class ReviewDecision(BaseModel):
    """The answer of ``POST /review``: the decision as recorded (and audited)."""

    feedback_id: str
    decision: Literal["accept", "reject"]
    label: str | None = Field(description="the accepted label; null when rejected")
    submitted_label: str
    reviewer: str
    decided_at: str


class Revocation(BaseModel):
    """The answer of ``POST /review/revoke``: the accepted label taken back from training."""

    feedback_id: str
    label: str | None = Field(description="the label that was accepted and is revoked")
    reviewer: str
    reason: str
    revoked_at: str
