"""ci/masking.py: secret values hidden in a stream of bytes, whichever way it is cut."""

import base64
import random

from ci import masking
from ci.masking import Masker, hide

SECRET = "s3cr3t-T0KEN-value"


def stream(values, pieces):
    masker = Masker(values)
    return b"".join(masker.feed(p) for p in pieces) + masker.flush()


def test_a_value_in_one_piece_is_masked():
    assert stream([SECRET], [f"token={SECRET}\n".encode()]) == b"token=***\n"


def test_every_occurrence_is_masked():
    text = f"{SECRET}{SECRET} and {SECRET}".encode()
    assert stream([SECRET], [text]) == b"****** and ***"


def test_a_value_split_at_every_point_is_masked():
    text = f"before {SECRET} after\n".encode()
    for cut in range(len(text) + 1):
        assert stream([SECRET], [text[:cut], text[cut:]]) == b"before *** after\n", cut


def test_a_value_fed_one_byte_at_a_time_is_masked():
    text = f"x{SECRET}y{SECRET}".encode()
    assert stream([SECRET], [bytes([b]) for b in text]) == b"x***y***"


def test_random_cuts_with_several_values():
    values = ["alpha-secret", "beta-secret-longer", "gamma!"]
    text = ("log " + " | ".join(values * 3) + " end").encode()
    expected = b"log " + b" | ".join([b"***"] * 9) + b" end"
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream(values, pieces) == expected


def test_a_value_inside_another_is_hidden_with_the_longer_one():
    # "cd" alone is a secret and so is "abcdef": the longer one must go whole, even split after "abcd"
    assert stream(["abcdef", "cdxy"], [b"--abcd", b"ef--"]) == b"--***--"
    assert stream(["abcdef", "cdxy"], [b"--abcd", b"xy--"]) == b"--ab***--"


def test_a_self_overlapping_value_split_in_the_middle():
    assert stream(["abab"], [b"ab", b"ab"]) == b"***"
    assert stream(["abab"], [b"aba", b"bab"]) == b"***ab"


def test_nothing_is_held_back_that_cannot_begin_a_value():
    masker = Masker([SECRET])
    assert masker.feed(b"plain output\n") == b"plain output\n"
    assert masker.held == 0
    assert masker.feed(b"partial s3cr") == b"partial "
    assert masker.held == 4
    assert masker.feed(b"ew") == b"s3crew"         # not the secret after all: let go at once
    assert masker.held == 0


def test_what_is_held_is_let_go_at_flush_and_is_shorter_than_the_value():
    masker = Masker([SECRET])
    out = masker.feed(SECRET[:-1].encode())
    assert out == b"" and masker.held == len(SECRET) - 1
    assert masker.flush() == SECRET[:-1].encode()
    assert masker.held == 0


def test_utf8_values_are_matched_as_bytes():
    value = "pässwörd-ünïcode"
    data = f"x {value} y".encode()
    cut = data.index("ö".encode()) + 1     # in the middle of a character
    assert stream([value], [data[:cut], data[cut:]]) == b"x *** y"


def test_no_values_is_a_pass_through():
    masker = Masker([])
    assert not masker
    assert masker.feed(b"abc") == b"abc"
    assert masker.flush() == b""


def test_only_the_exact_value_is_masked_not_a_transformed_one():
    encoded = base64.b64encode(SECRET.encode())
    assert stream([SECRET], [encoded]) == encoded


def test_hide_keeps_the_length():
    data = f"a {SECRET} b {SECRET}".encode()
    hidden = hide(data, [SECRET])
    assert len(hidden) == len(data)
    assert SECRET.encode() not in hidden
    assert hidden == b"a " + b"*" * len(SECRET) + b" b " + b"*" * len(SECRET)
    assert hide(b"nothing here", [SECRET]) == b"nothing here"
    assert hide(b"anything", []) == b"anything"


def test_the_mask_is_three_stars():
    assert masking.MASK == b"***"
