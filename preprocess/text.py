"""Caption text -> strict UTF-8, NFKC, without control or zero-width characters."""

from __future__ import annotations

import re
import unicodedata

from tessera.preprocess.config import TextConfig
from tessera.preprocess.modality import Modality, Stored
from tessera.preprocess.reject import Reject

_SPACE = re.compile(r"\s+")
# Zero-width and other format characters (Unicode Cf: ZWSP, ZWJ, BOM, bidi marks).
_INVISIBLE = {"Cf", "Cc"}


def decode_text(data: bytes, cfg: TextConfig) -> tuple[str, dict]:
    """Bytes of a text file -> str; other encodings only through configured repairs."""
    try:
        return data.decode("utf-8"), {}
    except UnicodeDecodeError as e:
        first_bad = f"byte 0x{data[e.start]:02x} at offset {e.start}"
        for encoding in cfg.repair_encodings:
            try:
                return data.decode(encoding), {"repaired_from": encoding}
            except UnicodeDecodeError:
                continue
        raise Reject("text.not_utf8", f"text is not valid UTF-8 ({first_bad}) and no repair is configured") from None


def check_words(text: str, cfg: TextConfig) -> None:
    """The quality filter on a normalized text's word count."""
    words = len(text.split())
    if cfg.min_words is not None and words < cfg.min_words:
        raise Reject("text.too_few_words", f"text has {words} words, under shard.text.min_words {cfg.min_words}")
    if cfg.max_words is not None and words > cfg.max_words:
        raise Reject("text.too_many_words", f"text has {words} words, over shard.text.max_words {cfg.max_words}")


def normalize_text(text: str, cfg: TextConfig) -> tuple[str | None, dict]:
    """NFKC, controls -> space, zero-width removed, whitespace collapsed.

    Whitespace-only text is no text (None)."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE
    )
    text = _SPACE.sub(" ", text).strip()
    if not text:
        return None, {}
    meta: dict = {}
    if len(text) > cfg.max_chars:
        if cfg.on_too_long == "reject":
            raise Reject("text.too_long", f"text has {len(text)} characters, over the maximum {cfg.max_chars}")
        meta["truncated_from"] = len(text)
        text = text[: cfg.max_chars].rstrip()
    return text, meta


def _stored(row, raw: dict[str, bytes], cfg, rng) -> Stored | None:
    """The sample's caption (inline, or its text file's bytes) normalized and checked."""
    meta: dict = {}
    if row.text is not None:
        text = row.text
    elif "text" in raw:
        text, repair = decode_text(raw["text"], cfg.text)
        meta.update(repair)
    else:
        return None
    normalized, norm_meta = normalize_text(text, cfg.text)
    meta.update(norm_meta)
    if normalized is None:
        meta["empty"] = True  # whitespace-only text is no text
        return Stored(None, meta)
    check_words(normalized, cfg.text)
    return Stored(normalized.encode(), meta, text_chars=len(normalized))


MODALITY = Modality("text", file_field="text_file", inline_field="text", member=lambda cfg: "txt", members=("txt",),
                    process=_stored, encoder="sentence-transformers", shown_as="caption", served_inline=False)
