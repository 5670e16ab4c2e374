"""A `data:` image URL -> a PIL image, within the server's limits (issue 39).

In order, each step refusing before the next costs anything: the declared MIME type must be an accepted format; the
base64 payload is decoded; Pillow opens the file lazily with only the accepted format's decoder (`Image.open(...,
formats=[...])` reads the header: format, width, height, no pixels) and the detected format must be the declared one;
width x height must be within `max_image_pixels`; only then are the pixels decoded, under a semaphore shared by all
requests, so that concurrent large images cannot add up. A refusal is an `ImageRefused` naming what was found and
the limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import threading
import zlib

from .limits import IMAGE_FORMATS, ServeLimits

# What a damaged or hostile file can raise from Pillow's decoders, besides OSError and ValueError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, zlib.error,
                  MemoryError)


class ImageRefused(ValueError):
    """An image the server does not decode; `code` is the OpenAI error code of the 400."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


class ImageReader:
    """Decodes `data:` image URLs within `limits`, at most `limits.max_concurrent_image_decodes` at a time."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.mime_types = limits.mime_types()
        self._decoding = threading.BoundedSemaphore(limits.max_concurrent_image_decodes)

    def declared_format(self, url) -> str:
        """The format a `data:` URL declares (checked without decoding anything)."""
        if not isinstance(url, str) or not url.startswith("data:"):
            shown = url if not isinstance(url, str) else url[:40] + ("..." if len(url) > 40 else "")
            raise ImageRefused(f"Only `data:` image URLs (base64) are accepted, got {shown!r}; this server does not "
                               "fetch remote images. Send `data:image/png;base64,<data>`.", code=None)
        header = url[5:url.find(",")] if "," in url else url[5:64]
        mime, _, encoding = header.partition(";")
        if encoding != "base64" or "," not in url:
            raise ImageRefused(f"The image URL must look like `data:image/png;base64,<data>`, got a header "
                               f"{('data:' + header)[:64]!r}.", code=None)
        name = self.mime_types.get(mime.strip().lower())
        if name is None:
            accepted = sorted(self.mime_types)
            raise ImageRefused(f"The image type {mime[:40]!r} is not accepted; send one of {accepted} (the server's "
                               "--image-formats).", code="unsupported_image_format")
        return name

    def read(self, url):
        """The RGB image of a `data:` URL."""
        from PIL import Image, UnidentifiedImageError

        declared = self.declared_format(url)
        try:
            data = base64.b64decode(url[url.index(",") + 1:], validate=True)
        except (binascii.Error, ValueError) as error:
            raise ImageRefused(f"The image's base64 payload could not be decoded: {error}.") from None
        if declared == "WEBP":  # Pillow's WebP open sets up libwebp's decoder, canvas included: check the size first
            self._check_size(*(_webp_size(data) or (0, 0)))
        try:
            # lazy: the header only, and only the declared format's decoder is tried
            image = Image.open(io.BytesIO(data), formats=[declared])
        except UnidentifiedImageError:
            detected = _sniff(data)
            found = f"a {detected} file" if detected else "not a file of any accepted format"
            raise ImageRefused(f"The image is declared as {IMAGE_FORMATS[declared][0]} but is {found}; declare its "
                               f"real type (accepted: {sorted(self.mime_types)}).",
                               code="image_type_mismatch" if detected else "invalid_image") from None
        except Image.DecompressionBombError as error:
            raise ImageRefused(f"The image is too large: {error}", code="image_too_large") from None
        except _DECODE_ERRORS as error:
            raise ImageRefused(f"The image could not be read: {error}.") from None
        self._check_size(*image.size)
        with self._decoding:
            try:
                image.load()
                return image.convert("RGB")
            except (*_DECODE_ERRORS, Image.DecompressionBombError) as error:
                raise ImageRefused(f"The image could not be decoded: {error}.") from None


    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.limits.max_image_pixels:
            raise ImageRefused(
                f"The image is {width} x {height} = {width * height} pixels (read from its header), over the "
                f"server's --max-image-pixels {self.limits.max_image_pixels}; send a smaller image.",
                code="image_too_large")


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP file's first chunk (RIFF container; the VP8X, VP8 or VP8L header), or None."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: canvas width - 1, height - 1 as 24-bit little-endian
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 ":  # lossy: 14-bit width and height after the frame tag and start code
        return (int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L":  # lossless: after the 0x2f signature, 14 bits of width - 1, 14 bits of height - 1
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


# File signatures of the accepted formats, to name what an image really is when its declared type is wrong.
_SIGNATURES = (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff"), ("GIF", b"GIF8"), ("BMP", b"BM"))


def _sniff(data: bytes) -> str | None:
    for name, signature in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None
