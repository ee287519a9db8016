"""Offline tokenizer building blocks (no vocabulary file is ever downloaded)."""

from __future__ import annotations


def byte_chars() -> list[str]:
    """One printable unicode character per byte, the byte-level BPE convention (GPT-2/CLIP):
    printable bytes map to themselves, the others to ``chr(256 + k)`` in order."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
