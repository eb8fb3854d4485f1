"""Input images: sources, limits checked before decoding, format sniffing, EXIF orientation, the alpha
rule and the size rule, on images made in code (tests/worker/image_samples.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.worker.image_samples import (
    b64,
    encoded,
    halves,
    jpeg_claiming,
    jpeg_with_orientation,
    png_bomb_header_only,
    png_header,
    truncated_png,
    webp_claiming,
)
from worker.errors import ImageFetchFailed, ImageInvalid
from worker.image_inputs import (
    ImageInputLimits,
    SizeBounds,
    choose_size,
    cover_crop,
    load_image_input,
    read_image_source,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = SizeBounds(min_side=64, max_side=2048, max_pixels=1536 * 1536)
LIMITS = ImageInputLimits()
RED, BLUE = (220, 20, 20), (20, 20, 220)


def load(value: str, limits: ImageInputLimits = LIMITS, bounds: SizeBounds = SMALL, **kwargs):
    return load_image_input(value, limits, bounds, **kwargs)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# ------------------------------------------------------------------------------------------ sources


def test_base64_png_is_read_as_is_when_already_a_multiple_of_64() -> None:
    image = Image.frombytes("RGB", (128, 64), bytes(range(256)) * 96)
    result = load(b64(encoded(image, "PNG")))
    assert result.image.tobytes() == image.tobytes()
    assert result.report.as_dict() == {
        "source": "base64",
        "format": "png",
        "bytes": len(encoded(image, "PNG")),
        "input_size": [128, 64],
        "exif_orientation": 1,
        "alpha_flattened": False,
        "size": [128, 64],
        "size_rule": "input",
        "crop": [0.0, 0.0, 128.0, 64.0],
        "resized": False,
        "warnings": [],
    }


def test_wrapped_urlsafe_and_unpadded_base64_are_accepted() -> None:
    data = encoded(Image.new("RGB", (64, 64), RED), "PNG")
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    urlsafe = b64(data).translate(str.maketrans("+/", "-_")).rstrip("=")
    for text in (wrapped, urlsafe):
        assert read_image_source(text, LIMITS).data == data


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", r"image \(base64\): not base64 \(character '!' at position 10\)"),
        ("/tmp/picture.png", r"not base64 \(character '\.' at position 12\)"),
        ("QUJD=QUJD", r"not valid base64"),
        ("", r"image: expected a string .* got an empty string"),
        ("file:///etc/passwd", r"file:// is not an image source"),
        ("ftp://host/a.png", r"ftp:// is not an image source"),
        ("data:image/png;base64", r"a data URL needs a comma"),
    ],
)
def test_bad_sources_are_image_invalid(value: str, message: str) -> None:
    with pytest.raises(ImageInvalid, match=message):
        load(value)


def test_a_non_string_is_refused() -> None:
    with pytest.raises(ImageInvalid, match=r"image: expected a string .* got dict"):
        load({"url": "x"})  # type: ignore[arg-type]


def test_base64_over_the_byte_cap_is_refused_before_decoding() -> None:
    text = "A" * 4000  # ~3000 bytes once decoded
    with pytest.raises(ImageInvalid, match=r"about 3000 bytes, over the 1000-byte input limit"):
        read_image_source(text + "!", ImageInputLimits(max_bytes=1000))  # the '!' would fail a decode


def test_data_url_with_a_wrong_media_type_is_read_by_its_bytes() -> None:
    data = encoded(Image.new("RGB", (64, 64), RED), "PNG")
    result = load(f"data:image/jpeg;base64,{b64(data)}")
    assert (result.report.source, result.report.format) == ("data_url", "png")
    assert result.report.warnings == (
        "image (data URL): declared image/jpeg, but the bytes are PNG; read as png",
    )
    plain = load(f"data:;base64,{b64(data)}")  # no media type: no warning
    assert plain.report.warnings == ()


def test_percent_encoded_data_url() -> None:
    data = encoded(Image.new("RGB", (64, 64), BLUE), "PNG")
    from urllib.parse import quote_from_bytes

    result = load("data:image/png," + quote_from_bytes(data))
    assert result.image.getpixel((0, 0)) == BLUE


def test_url_source_through_a_local_server(http_server, tmp_path: Path) -> None:
    (tmp_path / "a.webp").write_bytes(encoded(Image.new("RGB", (64, 64), RED), "WEBP", lossless=True))
    server = http_server(tmp_path)
    result = load(server.url("a.webp"), ImageInputLimits(allow_private_urls=True))
    assert (result.report.source, result.report.format) == ("url", "webp")
    assert result.image.getpixel((10, 10)) == RED
    with pytest.raises(ImageFetchFailed, match="loopback address"):
        load(server.url("a.webp"))  # the default limits refuse loopback


@pytest.mark.s3
def test_s3_source_with_the_workers_environment(s3_server, s3_bucket: str, monkeypatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    data = encoded(Image.new("RGB", (64, 64), BLUE), "JPEG", quality=95)
    s3_server.client().put_object(Bucket=s3_bucket, Key="x/in.jpg", Body=data, ContentType="image/jpeg")
    result = load(f"s3://{s3_bucket}/x/in.jpg")
    assert (result.report.source, result.report.format, result.report.warnings) == ("s3", "jpeg", ())
    assert close_to(result.image.getpixel((5, 5)), BLUE, 4)


# ------------------------------------------------------------------------------- formats, decoding


@pytest.mark.parametrize(
    ("data", "found"),
    [
        (encoded(Image.new("RGB", (8, 8)), "GIF"), "GIF"),
        (encoded(Image.new("RGB", (8, 8)), "BMP"), "BMP"),
        (encoded(Image.new("RGB", (8, 8)), "TIFF"), "TIFF"),
        (b"<!DOCTYPE html><html><body>login</body></html>", "an HTML page"),
        (b'{"error": "not found"}', "JSON text"),
        (b"\x00\x00\x00\x1cftypheic" + b"\0" * 20, "HEIC/HEIF"),
        (b"\x13\x37" * 40, "unrecognised binary data"),
        (b"", "an empty file"),
    ],
)
def test_other_formats_are_refused_by_name(data: bytes, found: str) -> None:
    with pytest.raises(ImageInvalid) as info:
        load(b64(data) if data else "data:image/png;base64,")
    assert f": {found}, not an image this worker reads; send PNG, JPEG or WebP" in str(info.value)


def test_a_refusal_never_echoes_the_bytes() -> None:
    with pytest.raises(ImageInvalid) as info:
        load(b64(b"SECRET-CONTENT-OF-A-PRIVATE-OBJECT"))
    assert "SECRET" not in str(info.value) and str(info.value).endswith("send PNG, JPEG or WebP")


def test_webp_lossless_decodes_exactly() -> None:
    image = Image.frombytes("RGB", (64, 64), bytes((i * 37) % 256 for i in range(64 * 64 * 3)))
    result = load(b64(encoded(image, "WEBP", lossless=True)))
    assert result.report.format == "webp"
    assert result.image.tobytes() == image.tobytes()


def test_a_png_signature_with_a_broken_header_is_image_invalid() -> None:
    bad_crc = bytearray(png_header(16, 16, b""))
    bad_crc[29] ^= 0xFF  # the IHDR chunk's CRC
    with pytest.raises(
        ImageInvalid, match=r"image \(base64\): the PNG header is invalid; re-export the file"
    ):
        load(b64(bytes(bad_crc)))
    for tail in (b"garbage", b"garbage" * 10):  # PIL fails these in two ways; both are the file's fault
        with pytest.raises(
            ImageInvalid, match=r"image \(base64\): (the PNG header is invalid|not a readable PNG)"
        ):
            load(b64(b"\x89PNG\r\n\x1a\n" + tail))


def test_a_truncated_png_is_image_invalid() -> None:
    with pytest.raises(ImageInvalid, match=r"image \(base64\): the PNG file is truncated or corrupt"):
        load(b64(truncated_png()))


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png_bomb_header_only(), "50000×50000"),
        (png_bomb_header_only(6000, 6000), "6000×6000"),
        (jpeg_claiming(60000, 60000), "60000×60000"),
        (webp_claiming(8000, 8000), "8000×8000"),
    ],
)
def test_decompression_bombs_are_refused_from_the_header(data: bytes, size: str) -> None:
    assert len(data) < 1000
    with pytest.raises(ImageInvalid) as info:
        load(b64(data))
    message = str(info.value)
    # Above twice PIL's own limit Image.open refuses it (DecompressionBombError); below, our cap does.
    assert "over the 16777216-pixel input limit" in message
    assert size in message or "could be decompression bomb" in message


def test_the_pixel_cap_is_the_limits_one() -> None:
    data = encoded(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageInvalid, match=r"100×100 is 10000 pixels, over the 5000-pixel input limit"):
        load(b64(data), ImageInputLimits(max_pixels=5000))


def test_limits_above_pils_own_bomb_guard_are_refused() -> None:
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        ImageInputLimits(max_pixels=Image.MAX_IMAGE_PIXELS + 1)


def test_refusing_a_bomb_keeps_peak_memory_small() -> None:
    """In a fresh process: refusing a 50,000² header bomb and a complete 6000² zero bomb (108 MB of
    pixels in a 100 kB file) raises the peak RSS by under 15 MB, while decoding a 3000² one under a
    larger limit raises it by at least its 27 MB of pixels (the measurement can see a decode)."""
    script = r"""
import json, re
from pathlib import Path
from tests.worker.image_samples import b64, png_bomb_header_only, png_zero_bomb
from worker.errors import ImageInvalid
from worker.image_inputs import ImageInputLimits, SizeBounds, load_image_input

def peak_mb():
    # VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's (pytest's) peak across exec.
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024

bounds = SizeBounds(min_side=64, max_side=2048, max_pixels=3072 * 3072)
inputs = [b64(png_bomb_header_only()), b64(png_zero_bomb(6000, 6000))]
control = b64(png_zero_bomb(3000, 3000))
before = peak_mb()
refused = 0
for text in inputs:
    try:
        load_image_input(text, ImageInputLimits(), bounds)
    except ImageInvalid:
        refused += 1
after_bombs = peak_mb()
load_image_input(control, ImageInputLimits(max_pixels=3000 * 3000), bounds)
after_control = peak_mb()
growth = {"bombs_mb": after_bombs - before, "control_mb": after_control - after_bombs}
print(json.dumps({"refused": refused, **growth}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["refused"] == 2
    assert result["bombs_mb"] < 15, result
    assert result["control_mb"] > 27, result


# ------------------------------------------------------------------------------ orientation, alpha


def test_exif_orientation_6_is_applied() -> None:
    """Orientation 6: the stored image is shown turned 90° clockwise. Stored 128×64 red|blue (left|right)
    shows as 64×128 red over blue."""
    data = jpeg_with_orientation(halves((128, 64), RED, BLUE), 6)
    result = load(b64(data))
    assert (result.report.exif_orientation, result.report.input_size, result.image.size) == (
        6,
        (64, 128),
        (64, 128),
    )
    assert close_to(result.image.getpixel((32, 16)), RED, 12)
    assert close_to(result.image.getpixel((32, 112)), BLUE, 12)


def test_rgba_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black
    image.paste(Image.new("RGBA", (32, 64), (255, 0, 0, 128)), (32, 0))  # half-transparent red
    result = load(b64(encoded(image, "PNG")))
    assert result.report.alpha_flattened
    assert result.image.mode == "RGB"
    assert result.image.getpixel((5, 5)) == (255, 255, 255)
    assert close_to(result.image.getpixel((50, 5)), (255, 127, 127), 1)


def test_an_opaque_alpha_channel_and_a_palette_with_transparency() -> None:
    opaque = load(b64(encoded(Image.new("RGBA", (64, 64), (*RED, 255)), "PNG")))
    assert (opaque.report.alpha_flattened, opaque.image.getpixel((0, 0))) == (False, RED)
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, *BLUE])
    palette.paste(1, (0, 0, 32, 64))
    result = load(b64(encoded(palette, "PNG", transparency=0)))  # index 0 is transparent
    assert result.report.alpha_flattened
    assert (result.image.getpixel((5, 5)), result.image.getpixel((50, 5))) == (BLUE, (255, 255, 255))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.full((64, 64), 32896, dtype=np.uint16)  # 128 * 257
    result = load(b64(encoded(Image.fromarray(values), "PNG")))
    assert result.image.getpixel((0, 0)) == (128, 128, 128)


# -------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("input_size", "width", "height", "expected"),
    [
        ((1000, 750), None, None, ((1024, 768), "input")),  # rounded to the nearest multiples of 64
        (
            (4000, 3000),
            None,
            None,
            ((1728, 1344), "input"),
        ),  # into 1536² pixels, the side rounded up most loses
        ((100, 50), None, None, ((512, 256), "input")),  # scaled up to the smallest side
        ((10000, 100), None, None, ((2048, 256), "input")),  # clamped to the side bounds (then cropped)
        ((1000, 750), 768, 512, ((768, 512), "requested")),
        ((1000, 750), 1024, None, ((1024, 768), "width")),
        ((1000, 500), None, 512, ((1024, 512), "height")),
        ((500, 1000), 2048, None, ((2048, 1152), "width")),  # 2048×2048 lowered into 1536² pixels
    ],
)
def test_choose_size(input_size, width, height, expected) -> None:
    assert choose_size(input_size, SizeBounds(), width, height) == expected


def test_choose_size_refuses_what_validation_should_have() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        choose_size((100, 100), SizeBounds(), 100, 128)


@pytest.mark.parametrize(
    ("input_size", "size", "crop"),
    [
        ((1000, 750), (1024, 768), (0, 0, 1000, 750)),
        ((10000, 100), (2048, 256), (4600, 0, 5400, 100)),
        ((600, 600), (512, 256), (0, 150, 600, 450)),
    ],
)
def test_cover_crop(input_size, size, crop) -> None:
    assert cover_crop(input_size, size) == pytest.approx(crop)


def test_requested_size_crops_the_centre_and_reports_it() -> None:
    image = Image.new("RGB", (300, 100), RED)
    image.paste(Image.new("RGB", (100, 100), BLUE), (100, 0))  # red | blue | red
    result = load(b64(encoded(image, "PNG")), width=64, height=64)
    assert (result.report.size_rule, result.report.crop, result.report.resized) == (
        "requested",
        (100.0, 0.0, 200.0, 100.0),
        True,
    )
    assert close_to(result.image.getpixel((32, 32)), BLUE, 2)
    assert close_to(result.image.getpixel((1, 32)), BLUE, 8)
