"""A multipart body checked before BentoML parses it.

BentoML hands a multipart body to Starlette's form parser, whose refusals (no boundary, a
text part over 1 MiB, more than 1,000 files or fields, malformed data) escape its handler
as a 500 with a traceback; and for a file field it fetches the URL that a text part holds,
server-side. The gateway runs `check_form` on the buffered body first, so such a request is
refused with a 4xx naming the problem and never reaches that parser. The limits are
Starlette's own (``Request.form()`` defaults), which BentoML does not let us raise.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_FILES = 1000
MAX_FIELDS = 1000
MAX_FIELD_BYTES = 1024 * 1024  # a text part; file parts are bounded by the body limit


class FormRefused(Exception):
    """The body would not parse, or would be misread; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Scan:
    """Parser callbacks that count parts and sizes the way Starlette's parser does."""

    file_fields: frozenset[str]
    files: int = 0
    fields: int = 0
    header: bytes = b""
    value: bytes = b""
    disposition: bytes = b""
    text_bytes: int | None = None  # bytes of the current text part; None in a file part

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": lambda d, s, e: self._add_header(d[s:e], b""),
            "on_header_value": lambda d, s, e: self._add_header(b"", d[s:e]),
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
        }

    def part_begin(self) -> None:
        self.disposition, self.text_bytes = b"", None

    def _add_header(self, name: bytes, value: bytes) -> None:
        self.header += name
        self.value += value

    def header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise FormRefused(400, "a multipart part has no name in its Content-Disposition")
        name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self.files += 1
            if self.files > MAX_FILES:
                raise FormRefused(413, f"more than {MAX_FILES} files in one multipart body")
            return
        if name in self.file_fields:
            # BentoML would take the text for a URL and download it: never.
            raise FormRefused(
                400, f"{name!r} parts must be file uploads (with a filename), not text values"
            )
        self.fields += 1
        if self.fields > MAX_FIELDS:
            raise FormRefused(413, f"more than {MAX_FIELDS} text fields in one multipart body")
        self.text_bytes = 0

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.text_bytes is None:
            return
        self.text_bytes += end - start
        if self.text_bytes > MAX_FIELD_BYTES:
            raise FormRefused(
                413, f"a text field is over the limit of {MAX_FIELD_BYTES} bytes; send a file"
            )


def check_form(content_type: str, body: bytes, file_fields: frozenset[str]) -> None:
    """Raise `FormRefused` unless `body` (multipart/form-data with the `content_type`
    header) parses within Starlette's limits and every part named in `file_fields` is a
    file upload."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not 1 <= len(boundary) <= 70:  # RFC 2046's boundary length
        raise FormRefused(400, "a multipart/form-data body needs a boundary (1 to 70 characters)")
    scan = _Scan(file_fields)
    try:
        parser = MultipartParser(boundary, scan.callbacks())  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise FormRefused(400, f"malformed multipart body: {e}") from None
