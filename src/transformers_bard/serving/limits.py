"""What `transformers-bard serve` accepts from a client (issue 39): every limit of the server, with its default.

The defaults bound what one request, or a flood of them, can cost: memory (body size, pixels per image, images per
prompt, concurrent image decodes, waiting requests), time (prompt tokens, the per-request time limit) and what a
file may ask the server to run (image formats: only the five decoders below are ever opened). Each field is a
`serve` flag of the same name (`--max-body-bytes`, ...) and an argument of `run_server` / `create_app`.
Pure Python: the CLI reads the defaults and help texts from here without importing the server.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Pillow format name -> the MIME types a `data:` URL may declare for it. Only these decoders are ever tried: no EPS
# (Ghostscript), no PSD, TIFF, ICO, ... whatever Pillow could open.
IMAGE_FORMATS = {
    "PNG": ("image/png",),
    "JPEG": ("image/jpeg", "image/jpg"),
    "WEBP": ("image/webp",),
    "GIF": ("image/gif",),
    "BMP": ("image/bmp", "image/x-ms-bmp"),
}


@dataclass
class ServeLimits:
    """The limits of `transformers-bard serve`; a request past one gets an OpenAI-shaped 4xx naming the limit.

    Args:
        max_body_bytes: largest request body, in bytes (413 past it). Images come base64-encoded in the body
            (4/3 of their file size).
        max_prompt_tokens: longest prompt, in tokens, images included (400 past it); the model's context minus one
            completion token caps it. Text longer than this many tokens times the tokenizer's longest token (in
            bytes) is refused before it is tokenized.
        max_images_per_prompt: images in one request, over all its messages (400 past it), counted before any is
            decoded.
        max_image_pixels: width x height of one image, read from the file's header before it is decoded (400 past
            it): a 17 KB PNG can declare 12000 x 12000 pixels.
        image_formats: the image formats accepted; a `data:` URL's declared type must be the detected format.
        max_concurrent_image_decodes: images decoded at the same time over all requests, so that concurrent
            requests cannot add up (decoded memory is at most this many times `max_image_pixels` x 4 bytes, twice
            while converting to RGB).
        max_waiting_requests: requests accepted but not yet decoding (their body being read and prepared, or queued
            for a free row); a request past them gets a 429 before its body is read.
        request_timeout: seconds from a request's arrival to its last token; a request still running then is
            cancelled (its row freed) and answered with a 408 (or an error event, when streaming).
    """

    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata={
        "help": "Largest request body in bytes; images are base64 in it (default 16 MiB; 413 past it)."})
    max_prompt_tokens: int = field(default=32768, metadata={
        "help": "Longest prompt in tokens, images included, capped by the context (default 32768; 400 past it). "
                "Far longer text is refused before it is tokenized."})
    max_images_per_prompt: int = field(default=8, metadata={
        "help": "Images in one request (default 8; 400 past it)."})
    max_image_pixels: int = field(default=4096 * 4096, metadata={
        "help": "Width x height of one image, read from its header before decoding (default 16777216 = 4096 x "
                "4096; 400 past it)."})
    image_formats: tuple[str, ...] = field(default=tuple(IMAGE_FORMATS), metadata={
        "help": f"Image formats accepted, among {' '.join(IMAGE_FORMATS)} (default all five); the data URL's "
                "declared type must match the file."})
    max_concurrent_image_decodes: int = field(default=2, metadata={
        "help": "Images decoded at once over all requests (default 2)."})
    max_waiting_requests: int = field(default=64, metadata={
        "help": "Requests accepted but not yet decoding (being prepared or waiting for a row); more get a 429 "
                "(default 64)."})
    request_timeout: float = field(default=600.0, metadata={
        "help": "Seconds a request may take from arrival to its last token; then it is cancelled and answered "
                "with a 408 (default 600)."})

    def __post_init__(self):
        self.image_formats = tuple(str(name).upper() for name in self.image_formats)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "image_formats":
                unknown = [name for name in value if name not in IMAGE_FORMATS]
                if not value or unknown:
                    raise ValueError(f"`image_formats` must be a non-empty subset of {list(IMAGE_FORMATS)}, got "
                                     f"{list(value)}; Pillow's other decoders (EPS runs Ghostscript) are never "
                                     "opened.")
            elif f.name == "request_timeout":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise ValueError(f"`request_timeout` must be a positive number of seconds, got {value!r}.")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{f.name}` must be an integer >= 1, got {value!r}.")

    def mime_types(self) -> dict[str, str]:
        """Declared MIME type -> the format it must be, for the accepted formats."""
        return {mime: name for name in self.image_formats for mime in IMAGE_FORMATS[name]}
