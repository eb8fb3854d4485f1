"""A job's image field (base64, data URL, https:// URL or s3:// object) as a checked RGB image whose sides
are multiples of 64, with a report of what was done to it.

The rules (docs/operations.md, "Image inputs"):
- Limits before decoding: the byte size (a base64 string's length, a Content-Length or S3 size, the
  bytes read), then width × height from the file header against `ImageInputLimits.max_pixels`. PIL's
  Image.open parses only the header; pixels are decoded (`load()`) after the check, so a decompression
  bomb costs a header parse. Image.MAX_IMAGE_PIXELS (PIL's own process-wide bomb guard, 89.5 MP) stays
  as PIL sets it: our cap is lower, and a limit above PIL's is refused when the limits are made.
- The format comes from the bytes: PNG, JPEG or WebP, else IMAGE_INVALID naming what the bytes are. A
  declared type (a data URL's media type, an HTTP Content-Type, an S3 ContentType) that disagrees goes
  into the report's warnings: the bytes win, because clients often label every upload image/png.
- EXIF orientation is applied (ImageOps.exif_transpose); sizes are reported after it. An animated image
  gives its first frame.
- Transparency is flattened onto white, as A1111 does (its img2img_background_color default): transparent
  PNGs are mostly cut-outs and logos made to sit on a white page, and a model sees transparent black
  (what dropping the alpha channel would leave) as a dark background it then keeps.
- Size (`choose_size`): the job's width and height when both are given; one of them: the other follows
  the input's aspect ratio; neither: the input's own size, scaled down into the generation pixel budget
  (or up to the smallest side) and rounded to the nearest multiple of 64. The image then covers that size
  and is centre-cropped (A1111's "crop and resize"): never stretched; the crop is reported.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import math
import re
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from fuseline.core.redact import redact
from worker.errors import ImageInvalid
from worker.image_fetch import IPNetwork, Resolver, describe_url, fetch_s3_object, fetch_url

# 20 MiB: RunPod's /runsync body limit, so an image that fits in a request also fits here.
DEFAULT_MAX_INPUT_BYTES = 20 * 1024 * 1024
# 4096 × 4096 (16.7 MP): above any phone photo's 12 MP and 2.6× the largest generation size (1536²);
# decoded as RGB it is 48 MiB, bounded whatever the file claims.
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096
DEFAULT_FETCH_TIMEOUT_S = 20.0
DEFAULT_MAX_REDIRECTS = 5

# Our format name -> PIL's. Only these parsers ever see untrusted bytes.
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MEDIA_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp"}
_UNTYPED = {"application/octet-stream", "binary/octet-stream"}
WHITE = (255, 255, 255)
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class ImageInputLimits:
    """What an input image may cost and where it may come from; the worker fills it from its settings
    (FUSELINE_MAX_INPUT_BYTES, FUSELINE_MAX_INPUT_PIXELS, FUSELINE_ALLOW_PRIVATE_URLS, …)."""

    max_bytes: int = DEFAULT_MAX_INPUT_BYTES
    max_pixels: int = DEFAULT_MAX_INPUT_PIXELS
    # Fetch from loopback/private/link-local/… addresses, and plain http:// (tests, trusted networks).
    allow_private_urls: bool = False
    # Address ranges fetched from even when private (an internal image host), e.g. 10.20.0.0/16.
    allowed_networks: tuple[IPNetwork, ...] = ()
    # One deadline for a whole URL fetch: DNS, connects, TLS, every redirect, the body.
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    # Buckets s3:// images may come from; None: any bucket the worker's keys can read.
    s3_buckets: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.fetch_timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError(f"image input limits must be positive: {self}")
        if self.max_pixels > Image.MAX_IMAGE_PIXELS:
            # PIL would warn about (and beyond twice its limit refuse) images our cap lets through.
            raise ValueError(
                f"max_pixels={self.max_pixels} is above PIL's decompression-bomb limit "
                f"Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}"
            )
        networks = tuple(ipaddress.ip_network(n) if isinstance(n, str) else n for n in self.allowed_networks)
        object.__setattr__(self, "allowed_networks", networks)


@dataclass(frozen=True)
class SizeBounds:
    """The sizes the worker generates at: sides multiples of 64 in [min_side, max_side], at most
    max_pixels (FUSELINE_MIN_SIZE, 2048, FUSELINE_MAX_PIXELS)."""

    min_side: int = 256
    max_side: int = 2048
    max_pixels: int = 1536 * 1536

    def __post_init__(self) -> None:
        if self.min_side % 64 or self.max_side % 64 or not 64 <= self.min_side <= self.max_side:
            raise ValueError(f"size bounds must be multiples of 64 with min_side <= max_side: {self}")
        if self.min_side * self.min_side > self.max_pixels:
            raise ValueError(f"max_pixels must allow a min_side square: {self}")


@dataclass(frozen=True)
class ImageSource:
    """The encoded bytes of an image field and where they came from."""

    data: bytes
    kind: str  # "base64" | "data_url" | "url" | "s3"
    declared_type: str | None  # media type the source claimed, lowercase, no parameters
    where: str  # the field and source as messages show them, e.g. "image (https://host/a.png)"
    redirects: int = 0


@dataclass(frozen=True)
class OpenedImage:
    """Checked, decoded pixels in their own mode, EXIF orientation applied."""

    image: Image.Image
    format: str  # "png" | "jpeg" | "webp"
    exif_orientation: int  # the EXIF Orientation tag that was applied (1: none)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageInputReport:
    """What was done to an input image; `as_dict()` is what the job's output reports."""

    source: str
    format: str
    bytes: int
    input_size: tuple[int, int]  # width, height as decoded, after EXIF orientation
    exif_orientation: int
    alpha_flattened: bool  # True when some pixel was not opaque and was composited onto white
    size: tuple[int, int]  # width, height of the image handed on
    size_rule: str  # "requested" | "width" | "height" | "input" (see choose_size)
    crop: tuple[float, float, float, float]  # region of the oriented input scaled to `size` (l, t, r, b)
    resized: bool
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("input_size", "size", "crop", "warnings"):
            out[key] = list(out[key])
        return out


@dataclass(frozen=True)
class InputImage:
    image: Image.Image  # RGB, `report.size`
    report: ImageInputReport


# ----------------------------------------------------------------------------------------- sources


def _check_encoded_size(size: int, limits: ImageInputLimits, where: str) -> None:
    if size > limits.max_bytes:
        raise ImageInvalid(
            f"{where}: the image is about {size} bytes, over the {limits.max_bytes}-byte input limit; send a "
            "smaller file (PNG/JPEG/WebP at the size you generate at), or a URL if the request body is the "
            "problem"
        )


def decode_base64(text: str, limits: ImageInputLimits, where: str) -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; the size is checked from the
    text's length before anything is decoded."""
    compact = "".join(text.split())  # line-wrapped base64 (MIME, the base64 CLI) is common
    _check_encoded_size(len(compact) * 3 // 4, limits, where)
    bad = next((i for i, c in enumerate(text) if c not in _BASE64_ALPHABET and not c.isspace()), None)
    if bad is not None:
        raise ImageInvalid(
            f"{where}: not base64 (character {text[bad]!r} at position {bad}); give the image as base64, "
            "a data: URL, an https:// URL or an s3:// object"
        )
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    padded = compact.rstrip("=")
    padded += "=" * (-len(padded) % 4)
    try:
        return base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageInvalid(f"{where}: not valid base64 ({err}); re-encode the file") from None


def _data_url(text: str, limits: ImageInputLimits, field_name: str) -> ImageSource:
    header, comma, payload = text[len("data:") :].partition(",")
    where = f"{field_name} (data URL)"
    if not comma:
        raise ImageInvalid(f"{where}: a data URL needs a comma before its data: data:image/png;base64,<data>")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0] or None
    if "base64" in params[1:]:
        data = decode_base64(payload, limits, where)
    else:
        _check_encoded_size(len(payload), limits, where)  # percent-decoding only shrinks it
        data = urllib.parse.unquote_to_bytes(payload)
    return ImageSource(data, "data_url", media, where)


def read_image_source(
    value: object,
    limits: ImageInputLimits,
    *,
    field_name: str = "image",
    resolver: Resolver | None = None,
    s3_client: Any | None = None,
) -> ImageSource:
    """The bytes an image field names: a data URL, an https:// URL, an s3://bucket/key object, or base64.

    ImageInvalid for a value that is none of these or too large; ImageFetchFailed when a URL or object
    cannot be fetched. `resolver` (tests) and `s3_client` (the worker's shared client) go to the fetchers."""
    if not isinstance(value, str) or not value.strip():
        raise ImageInvalid(
            f"{field_name}: expected a string (base64, a data: URL, an https:// URL or an s3:// object), got "
            f"{'an empty string' if isinstance(value, str) else type(value).__name__}"
        )
    text = value.strip()
    head = text[:16].lower()
    if head.startswith("data:"):
        return _data_url(text, limits, field_name)
    scheme = _SCHEME_RE.match(text)
    if scheme is None:
        where = f"{field_name} (base64)"
        return ImageSource(decode_base64(text, limits, where), "base64", None, where)
    name = scheme.group(1).lower()
    if name in ("http", "https"):
        fetched = fetch_url(
            text,
            max_bytes=limits.max_bytes,
            timeout_s=limits.fetch_timeout_s,
            max_redirects=limits.max_redirects,
            allow_private=limits.allow_private_urls,
            allowed_networks=limits.allowed_networks,
            resolver=resolver,
            field_name=field_name,
        )
        where = f"{field_name} ({describe_url(text)})"
        return ImageSource(fetched.data, "url", _media_type(fetched.content_type), where, fetched.redirects)
    if name == "s3":
        fetched = fetch_s3_object(
            text,
            max_bytes=limits.max_bytes,
            client=s3_client,
            read_timeout_s=max(1, math.ceil(limits.fetch_timeout_s)),
            allowed_buckets=limits.s3_buckets,
            field_name=field_name,
        )
        return ImageSource(fetched.data, "s3", _media_type(fetched.content_type), f"{field_name} ({text})")
    raise ImageInvalid(
        redact(
            f"{field_name}: {name}:// is not an image source; give base64, a data: URL, an https:// URL "
            "or an s3:// object"
        )
    )


def _media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


# ------------------------------------------------------------------------------------------ format


def sniff_format(data: bytes) -> str | None:
    """ "png", "jpeg" or "webp" from the file's signature, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


# Signatures of formats people send by mistake, to name them in the refusal. A table instead of asking PIL
# to identify the bytes: no parser beyond the three accepted ones ever reads untrusted input.
_KNOWN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
)


def describe_format(data: bytes) -> str:
    """What unaccepted bytes look like, in words; never the bytes themselves (an s3:// object the worker
    can read but the caller cannot must not leak through the message)."""
    if not data:
        return "an empty file"
    for signature, name in _KNOWN_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIC/HEIF"
        return "an MP4/QuickTime media file"
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "SVG/XML text"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"{", b"[")):
        return "JSON text"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:256]):
        return "text"
    return "unrecognised binary data"


# ---------------------------------------------------------------------------------------- decoding


def open_image(data: bytes, limits: ImageInputLimits, where: str) -> OpenedImage:
    """Decode `data` after the format and pixel checks, and apply its EXIF orientation."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageInvalid(
            f"{where}: {describe_format(data)}, not an image this worker reads; send PNG, JPEG or WebP"
        )
    label = PIL_FORMATS[fmt]
    try:
        image = Image.open(io.BytesIO(data), formats=[label])
    except Image.DecompressionBombError as err:  # PIL's own guard, past twice Image.MAX_IMAGE_PIXELS
        raise ImageInvalid(
            f"{where}: {err.args[0] if err.args else 'too many pixels'}; over the {limits.max_pixels}-pixel "
            "input limit: scale it down before sending"
        ) from None
    except MemoryError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, nothing useful
        raise ImageInvalid(f"{where}: the {label} header is invalid; re-export the file") from None
    except Exception as err:  # any parser failure on untrusted bytes is the file's fault
        raise ImageInvalid(f"{where}: not a readable {label} file ({err}); re-export it") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        side = math.isqrt(limits.max_pixels)
        raise ImageInvalid(
            f"{where}: {width}×{height} is {width * height} pixels, over the {limits.max_pixels}-pixel input "
            f"limit (about {side}×{side}); scale it down before sending (it is resized to the generation "
            "size anyway)"
        )
    warnings: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        warnings.append(f"{where}: animated {label}; its first frame is used")
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as err:
        raise ImageInvalid(
            f"{where}: the {label} file is truncated or corrupt ({err}); re-export or re-upload it"
        ) from None
    orientation = 1
    try:
        orientation = int(image.getexif().get(0x0112, 1))  # 0x0112: the EXIF Orientation tag
        oriented = ImageOps.exif_transpose(image) or image
    except MemoryError:
        raise
    except Exception as err:  # a broken EXIF block should not cost the picture
        warnings.append(f"{where}: unreadable EXIF ({err}); orientation not applied")
        orientation, oriented = 1, image
    if orientation not in range(1, 9):
        orientation = 1
    return OpenedImage(oriented, fmt, orientation, tuple(warnings))


def _sixteen_bit_grey_to_l(image: Image.Image) -> Image.Image:
    # PIL's convert() clips 16-bit grey to 0-255 (everything above 255 turns white); scale it instead.
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def flatten_to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> tuple[Image.Image, bool]:
    """`image` as RGB; transparency composited onto `background` (white: see the module docstring).
    Also says whether any pixel was not opaque."""
    if image.mode.startswith("I"):
        image = _sixteen_bit_grey_to_l(image)
    if not has_transparency(image):
        return image.convert("RGB"), False
    rgba = image.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:  # an alpha channel that is opaque everywhere
        return rgba.convert("RGB"), False
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB"), True


# ------------------------------------------------------------------------------------------- sizes


def _round64(value: float) -> int:
    return max(64, int(value / 64 + 0.5) * 64)


def _clamp(value: int, bounds: SizeBounds) -> int:
    return min(max(value, bounds.min_side), bounds.max_side)


def _check_side(name: str, value: int, bounds: SizeBounds) -> None:
    if value % 64 or not bounds.min_side <= value <= bounds.max_side:
        raise ValueError(
            f"{name}={value} must be a multiple of 64 in [{bounds.min_side}, {bounds.max_side}] "
            "(the job input's validation should have refused it)"
        )


def choose_size(
    input_size: tuple[int, int], bounds: SizeBounds, width: int | None = None, height: int | None = None
) -> tuple[tuple[int, int], str]:
    """The generation size for an input image, and the rule that chose it:

    - "requested": width and height both given: those (the job's validation has checked them);
    - "width" / "height": only that one given: the other side follows the input's aspect ratio, rounded
      to the nearest multiple of 64, clamped to the side bounds and lowered until within max_pixels;
    - "input": neither given: the input's size scaled down to fit max_pixels (never scaled up, except to
      bring its smaller side to min_side), each side rounded to the nearest multiple of 64 and clamped to
      the side bounds; while the rounded size is over max_pixels, the side rounded up the most loses 64.
    """
    w, h = input_size
    if width is not None and height is not None:
        _check_side("width", width, bounds)
        _check_side("height", height, bounds)
        if width * height > bounds.max_pixels:
            raise ValueError(f"{width}x{height} is over max_pixels={bounds.max_pixels}")
        return (width, height), "requested"
    if width is not None or height is not None:
        given = width if width is not None else height
        assert given is not None
        _check_side("width" if width is not None else "height", given, bounds)
        other = _clamp(_round64(given * (h / w if width is not None else w / h)), bounds)
        while given * other > bounds.max_pixels and other > bounds.min_side:
            other -= 64
        if given * other > bounds.max_pixels:
            raise ValueError(f"{given} x {bounds.min_side} is over max_pixels={bounds.max_pixels}")
        return ((given, other) if width is not None else (other, given)), (
            "width" if width is not None else "height"
        )
    scale = min(1.0, math.sqrt(bounds.max_pixels / (w * h)))
    if min(w, h) * scale < bounds.min_side:
        scale = bounds.min_side / min(w, h)
    exact = (w * scale, h * scale)
    sides = [_clamp(_round64(exact[0]), bounds), _clamp(_round64(exact[1]), bounds)]
    while sides[0] * sides[1] > bounds.max_pixels:
        shrinkable = [i for i in (0, 1) if sides[i] - 64 >= bounds.min_side]
        i = max(shrinkable, key=lambda i: sides[i] - exact[i])
        sides[i] -= 64
    return (sides[0], sides[1]), "input"


def cover_crop(input_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred region of an `input_size` image with the aspect ratio of `size`: scaled to `size`, it
    covers it exactly (A1111's "crop and resize"). Written out rather than ImageOps.fit so the image and
    its mask get the very same box."""
    w, h = input_size
    tw, th = size
    scale = max(tw / w, th / h)
    cw, ch = tw / scale, th / scale
    left, top = (w - cw) / 2, (h - ch) / 2
    return (left, top, left + cw, top + ch)


def resize_to(
    image: Image.Image, size: tuple[int, int], crop: tuple[float, float, float, float]
) -> Image.Image:
    """`crop` of `image` resampled (Lanczos) to `size`; the image itself when nothing changes."""
    if image.size == size and crop == (0.0, 0.0, float(size[0]), float(size[1])):
        return image
    return image.resize(size, Image.Resampling.LANCZOS, box=crop)


# ---------------------------------------------------------------------------------------- the whole


def _type_warning(source: ImageSource, fmt: str) -> list[str]:
    declared = source.declared_type
    if declared is None or declared in _UNTYPED or _MEDIA_TYPES.get(declared) == fmt:
        return []
    return [f"{source.where}: declared {declared}, but the bytes are {PIL_FORMATS[fmt]}; read as {fmt}"]


def load_image_input(
    value: object,
    limits: ImageInputLimits,
    bounds: SizeBounds,
    *,
    width: int | None = None,
    height: int | None = None,
    field_name: str = "image",
    resolver: Resolver | None = None,
    s3_client: Any | None = None,
) -> InputImage:
    """A job's image field as an RGB image at the generation size (see `choose_size`), with its report.

    `width`/`height`: the job's, when it gave them (already validated against `bounds`). Raises
    ImageInvalid / ImageFetchFailed with messages naming `field_name` and the fix."""
    source = read_image_source(value, limits, field_name=field_name, resolver=resolver, s3_client=s3_client)
    opened = open_image(source.data, limits, source.where)
    rgb, flattened = flatten_to_rgb(opened.image)
    size, rule = choose_size(rgb.size, bounds, width, height)
    crop = cover_crop(rgb.size, size)
    resized = resize_to(rgb, size, crop)
    report = ImageInputReport(
        source=source.kind,
        format=opened.format,
        bytes=len(source.data),
        input_size=rgb.size,
        exif_orientation=opened.exif_orientation,
        alpha_flattened=flattened,
        size=size,
        size_rule=rule,
        crop=tuple(round(v, 2) for v in crop),  # type: ignore[arg-type]
        resized=resized is not rgb,
        warnings=(*opened.warnings, *_type_warning(source, opened.format)),
    )
    return InputImage(resized, report)
