from tessera.preprocess.keys import MAX_KEY_CHARS, safe_key


def test_safe_keys_pass_unchanged():
    assert safe_key("face-01") == "face-01" and safe_key("s_00000001") == "s_00000001"


def test_unsafe_keys_lose_slashes_dots_and_dotdot():
    for key in ("../../etc/passwd", "v1.2.final", "a/b", "..", "ümlaut key", "x" * 200):
        safe = safe_key(key)
        assert "/" not in safe and "." not in safe and ".." not in safe
        assert 0 < len(safe) <= MAX_KEY_CHARS


def test_distinct_keys_stay_distinct():
    keys = ["a.b", "a_b", "a/b", "a b", "a..b"]
    assert len({safe_key(k) for k in keys}) == len(keys)
    spelled = safe_key("a.b")  # a key that is literally what another key is rewritten to
    assert spelled.startswith("a_b_") and safe_key(spelled) != spelled
    assert len({safe_key(k) for k in [*keys, spelled, safe_key("x/y")]}) == len(keys) + 2
