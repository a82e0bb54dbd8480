"""What medical_ct.serving.http gives the service's inputs, through BentoML's own input model."""

import io
import struct
from pathlib import Path
from typing import Annotated

import bentoml
import pytest
from bentoml.validators import ContentType
from pydantic import BeforeValidator, ValidationError
from starlette.datastructures import Headers, UploadFile

from medical_ct.serving.http import explain_dicom_upload

DICOM = (
    b"\0" * 128
    + b"DICM"
    + struct.pack("<HH2sH", 2, 0x10, b"UI", 20)
    + b"1.2.840.10008.1.2.1\0"
    + bytes(4096)
)


def upload(data: bytes, content_type: str, name: str = "scan.dcm") -> UploadFile:
    headers = Headers({"content-type": content_type})
    return UploadFile(io.BytesIO(data), filename=name, headers=headers)


@pytest.fixture(scope="module")
def image_input():
    """The input model BentoML makes for an image upload checked as the service's is."""
    image = Annotated[Path, ContentType("image/*"), BeforeValidator(explain_dicom_upload)]

    @bentoml.service
    class Probe:
        @bentoml.api
        def predict(self, image: image) -> str:
            return ""

    return Probe.apis["predict"].input_spec


@pytest.mark.parametrize("content_type", ["application/dicom", "application/octet-stream"])
def test_a_dicom_upload_of_another_type_is_named_in_bentomls_validation_error(
    image_input, content_type
):
    """BentoML said only "Invalid content type application/dicom, expected image/*" (hunt of
    2026-12-05); curl sends a .dcm as application/octet-stream."""
    with pytest.raises(ValidationError) as refused:
        image_input.model_validate({"image": upload(DICOM, content_type)})

    message = str(refused.value)
    assert "DICOM" in message and "PNG" in message and "pydicom" in message
    assert "Invalid content type" not in message


def test_any_other_upload_gets_bentomls_own_check(image_input):
    with pytest.raises(ValidationError, match="Invalid content type text/plain, expected image"):
        image_input.model_validate({"image": upload(b"hello", "text/plain", "notes.txt")})
    unread = upload(b"not DICOM at all" * 20, "application/octet-stream", "x.bin")
    assert explain_dicom_upload(unread) is unread and unread.file.tell() == 0
    image = upload(DICOM, "image/dicom")  # an image type: the preprocessing names DICOM
    assert explain_dicom_upload(image) is image
