"""Caption files: the extension that marks them and decoding their bytes into caption lines."""

from __future__ import annotations

CAPTION_EXTENSION = ".txt"


class BadSampleError(ValueError):
    """A sample whose files exist but hold nothing usable; `reason` is a short category for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def captions_from_bytes(raw: bytes) -> list[str]:
    """All non-blank caption lines of a text file; UTF-8 (or UTF-16 with a BOM), invalid bytes replaced.

    Raises BadSampleError('empty caption') when no line holds a printable character, and
    BadSampleError('binary caption') when over a quarter of the characters are undecodable or control
    characters (binary data, not text).
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        text = raw.decode("utf-8-sig", errors="replace")
    captions = []
    for line in text.splitlines():
        # control characters (e.g. NULs of a mis-encoded file) carry no meaning for a caption
        line = "".join(char for char in line if char.isprintable() or char == "\t").strip()
        if line.strip("\ufffd \t"):
            captions.append(line)
    if not captions:
        raise BadSampleError("empty caption", "no non-blank line")
    # Bytes that are not text (an image saved as .txt, a wrong encoding) decode to replacement and control
    # characters; a caption made mostly of those is garbage, not a caption.
    garbage = sum(1 for char in text if char == "\ufffd" or (not char.isprintable() and char not in "\t\r\n"))
    if garbage > 0.25 * max(1, len(text.strip())):
        raise BadSampleError("binary caption", f"{garbage} of {len(text)} characters are not text")
    return captions
