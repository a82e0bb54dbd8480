"""The one preprocessing function: every kind of input it may meet."""

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medical_ct.preprocessing import (
    IMAGE_SIZE,
    MAX_IMAGE_PIXELS,
    InvalidImageError,
    content_hash,
    preprocess_image,
)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.fixture
def sample_jpeg(sample_dir) -> bytes:
    return next((sample_dir / "Hand").glob("*.jpeg")).read_bytes()


def test_mednist_jpeg_decodes_to_its_own_pixels(sample_jpeg):
    pixels = preprocess_image(sample_jpeg)
    expected = np.asarray(Image.open(io.BytesIO(sample_jpeg)).convert("L"))
    assert pixels.dtype == np.uint8
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(pixels, expected)


def test_other_sizes_are_resized():
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (200, 1))
    pixels = preprocess_image(encode(Image.fromarray(gradient), "PNG"))
    assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert pixels[:, 0].mean() < 20 and pixels[:, -1].mean() > 235


def test_rgb_and_cmyk_become_grayscale():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    assert preprocess_image(encode(red, "PNG")).mean() == pytest.approx(76, abs=1)
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # white
    assert preprocess_image(encode(cmyk, "JPEG")).mean() == pytest.approx(255, abs=2)


def test_rgba_transparency_is_flattened_onto_black():
    image = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    image.paste((255, 255, 255, 255), (0, 0, 32, 64))
    pixels = preprocess_image(encode(image, "PNG"))
    assert pixels[:, :32].min() == 255
    assert pixels[:, 32:].max() == 0


def test_the_samples_jpegs_decode_as_before(sample_dir):
    """Training, evaluation and serving share this function and MedNIST is 8-bit JPEG: the
    16-bit mapping changed, these pixels did not. Each decodes to its own grey levels, and the
    digest of all 240 is the one the code before that change gave (a new JPEG decoder in
    Pillow could change it too: the decoded sets' hashes would then change with it)."""
    digest = hashlib.sha256()
    for path in sorted(sample_dir.glob("*/*.jpeg")):
        pixels = preprocess_image(path.read_bytes())
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(path).convert("L")))
        digest.update(pixels.tobytes())
    assert digest.hexdigest() == SAMPLE_PIXELS_SHA256


SAMPLE_PIXELS_SHA256 = "9c08f83b5747d64d46dced9f158aaf77038511a99d5cc16246e2d4a453781b8b"


def test_sixteen_bit_png_over_the_full_range_is_scaled_to_eight_bits():
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = preprocess_image(encode(image, "PNG"))
    np.testing.assert_array_equal(pixels, np.round(values * (255 / 65535)).astype(np.uint8))


@pytest.mark.parametrize(("factor", "bits"), [(257, 16), (16, 12), (4, 10)])
def test_a_mednist_image_stored_in_a_16_bit_png_gives_its_8_bit_pixels(sample_dir, factor, bits):
    """A scanner storing 12 (or 10) bits in a 16-bit PNG: the right shift by 8 that assumed all
    16 bits turned 0-4095 into 0-15, a near-black image the champion called HeadCT or
    BreastMRI, 98% unflagged (hunt of 2026-12-05: 600 test images of all six classes). Each
    sample image, stored at each depth, now gives its own pixels within one grey level, the
    CT images' grey background (78-120) included. Two HeadCT images are one flat grey: they
    hold no sign of the depth they came from, and are left out."""
    compared = 0
    for path in sorted(sample_dir.glob("*/*.jpeg")):
        original = preprocess_image(path.read_bytes())
        if original.min() == original.max():
            continue
        values = original.astype(np.uint16) * factor
        assert int(values.max()).bit_length() <= bits
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        pixels = preprocess_image(encode(image, "PNG"))
        difference = np.abs(pixels.astype(int) - original.astype(int)).max()
        assert difference <= 1, f"{path.parent.name}/{path.name}: {difference} grey levels off"
        compared += 1
    assert compared >= 230


def test_same_pixels_in_another_encoding_share_a_content_hash(sample_jpeg):
    pixels = preprocess_image(sample_jpeg)
    png = encode(Image.fromarray(pixels), "PNG")
    assert content_hash(preprocess_image(png)) == content_hash(pixels)
    assert content_hash(pixels) != content_hash(255 - pixels)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"Patient: Jane Doe\nThis is a text file, not an image.\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 10, "not an image|cannot be decoded"),
    ],
    ids=["zero-bytes", "text-file", "jpeg-magic-only"],
)
def test_non_images_are_refused_with_a_reason(data, message):
    with pytest.raises(InvalidImageError, match=message):
        preprocess_image(data)


def dicom_file() -> bytes:
    """How a DICOM file begins (a PACS export): a 128-byte preamble, "DICM", its meta group."""
    meta = struct.pack("<HH2sH", 2, 0x10, b"UI", 20) + b"1.2.840.10008.1.2.1\0"
    return b"\0" * 128 + b"DICM" + meta + bytes(4096)


def test_a_dicom_file_is_named_and_the_way_to_a_png_said():
    """It was "not an image Pillow can read", which says nothing to whoever sent a scan."""
    with pytest.raises(InvalidImageError) as refused:
        preprocess_image(dicom_file())
    message = str(refused.value)
    assert "DICOM" in message and "PNG" in message and "pydicom" in message


def test_truncated_jpeg_is_refused(sample_jpeg):
    with pytest.raises(InvalidImageError, match="cannot be decoded"):
        preprocess_image(sample_jpeg[: len(sample_jpeg) // 2])


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [10_000, 50_000])
def test_decompression_bomb_is_refused_before_decoding(side):
    assert side * side > MAX_IMAGE_PIXELS
    with pytest.raises(InvalidImageError, match="too large"):
        preprocess_image(png_declaring(side, side))


def test_animated_gif_is_refused():
    frames = [Image.new("L", (64, 64), value) for value in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidImageError, match="3 frames"):
        preprocess_image(buffer.getvalue())


def corrupt_tiff() -> bytes:
    """A 4x4 TIFF whose second IFD has no entries: Pillow raises TypeError('Missing
    dimensions') counting its frames (a fuzzed TIFF did so in the raw store)."""
    data = bytearray(encode(Image.new("L", (4, 4), 128), "TIFF"))
    assert data[:2] == b"II"
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    struct.pack_into("<I", data, first + 2 + 12 * entries, len(data))  # next IFD: appended
    return bytes(data) + struct.pack("<HI", 0, 0)


def corrupt_gif() -> bytes:
    """A 4x4 GIF cut after an extension's introducer: Pillow raises IndexError counting its
    frames."""
    data = encode(Image.new("L", (4, 4), 128), "GIF")
    assert data.endswith(b";")
    return data[:-1] + b"!"


@pytest.mark.parametrize(
    ("data", "message"),
    [(corrupt_tiff(), "TypeError: Missing dimensions"), (corrupt_gif(), "IndexError")],
    ids=["tiff-without-dimensions", "gif-cut-in-an-extension"],
)
def test_whatever_the_decoder_raises_on_corrupt_bytes_is_an_invalid_image(data, message):
    """The decode run rejects such a file (naming it) and the service answers 422: a
    TypeError or IndexError stopped the run and was a 500."""
    with pytest.raises(InvalidImageError, match=f"cannot be decoded .*{message}"):
        preprocess_image(data)


def test_running_out_of_memory_is_not_called_a_bad_image(monkeypatch):
    """A MemoryError says nothing about the file: it stops the run rather than reject it."""

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image, "open", out_of_memory)
    with pytest.raises(MemoryError):
        preprocess_image(b"any bytes")
