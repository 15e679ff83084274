import pytest

from tessera.preprocess.config import TextConfig
from tessera.preprocess.reject import Reject
from tessera.preprocess.text import decode_text, normalize_text
from tests.conftest import DIRTY


def test_messy_caption_is_normalized():
    messy = "  A rocket\u200b on\tthe  \uff50\uff41\uff44.\u0007  "
    assert normalize_text(messy, TextConfig()) == ("A rocket on the pad.", {})


def test_controls_are_removed_and_line_breaks_become_spaces():
    assert normalize_text("one\u0000two\r\nthree\ufeff", TextConfig())[0] == "onetwo three"


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "\u200b\u200d", "\u0007"])
def test_whitespace_only_text_is_no_text(blank):
    assert normalize_text(blank, TextConfig())[0] is None


def test_non_utf8_is_rejected_unless_a_repair_is_configured():
    latin1 = (DIRTY / "files" / "latin1.txt").read_bytes()
    with pytest.raises(Reject, match=r"not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        decode_text(latin1, TextConfig())
    text, meta = decode_text(latin1, TextConfig(repair_encodings=("cp1252",)))
    assert text == "Café au lait, très bon" and meta == {"repaired_from": "cp1252"}


def test_utf8_is_not_marked_as_repaired():
    assert decode_text("Café".encode(), TextConfig(repair_encodings=("cp1252",))) == ("Café", {})


def test_too_long_text_is_rejected_or_truncated():
    long = "word " * 100
    with pytest.raises(Reject, match="499 characters, over the maximum 50"):
        normalize_text(long, TextConfig(max_chars=50))
    text, meta = normalize_text(long, TextConfig(max_chars=50, on_too_long="truncate"))
    assert len(text) <= 50 and meta == {"truncated_from": 499}
