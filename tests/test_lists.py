"""List patterns: validation, canonical form, matching and precedence."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cleanmail import lists
from cleanmail.lists import Rule


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("User@Example.COM", "user@example.com"),
        ("<user@example.com>", "user@example.com"),
        ("example.com", "example.com"),
        ("*@Example.com", "example.com"),
        ("*.example.com", "*.example.com"),
        ("news-*@example.com", "news-*@example.com"),
        ("bødker.dk", "xn--bdker-vua.dk"),
    ],
)
def test_normalize(text: str, canonical: str) -> None:
    assert lists.normalize(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "*",
        "*@*",
        "com",
        "user@",
        "a b@example.com",
        "user@exa_mple.com",
        "x" * 400,
        "user@-bad.com",
        "<script>@example.com",
    ],
)
def test_invalid_patterns_say_why(text: str) -> None:
    with pytest.raises(lists.ListError):
        lists.normalize(text)


@pytest.mark.parametrize(
    ("pattern", "address", "expected"),
    [
        ("user@example.com", "USER@example.com", True),
        ("user@example.com", "other@example.com", False),
        ("example.com", "anyone@example.com", True),
        ("example.com", "anyone@sub.example.com", False),
        ("*.example.com", "anyone@sub.example.com", True),
        ("*.example.com", "anyone@example.com", True),
        ("*.example.com", "anyone@badexample.com", False),
        ("news-*@example.com", "news-2026@example.com", True),
        ("news-*@example.com", "billing@example.com", False),
        ("example.com", "", False),
    ],
)
def test_matches(pattern: str, address: str, expected: bool) -> None:
    assert lists.matches(pattern, address) is expected


def rule(n: int, scope: str, action: str, pattern: str) -> Rule:
    return Rule(n, scope, action, pattern, None, None)


def test_mailbox_beats_domain_beats_global() -> None:
    rules = [
        rule(1, "global", "block", "example.com"),
        rule(2, "domain", "allow", "example.com"),
        rule(3, "mailbox", "block", "example.com"),
    ]
    first = lists.decide(rules, [("envelope", "a@example.com")])[0]
    assert first.entry_id == 3


def test_narrower_pattern_wins_and_block_wins_a_tie() -> None:
    rules = [
        rule(1, "mailbox", "block", "example.com"),
        rule(2, "mailbox", "allow", "boss@example.com"),
    ]
    assert lists.decide(rules, [("from", "boss@example.com")])[0].action == "allow"
    tie = [rule(1, "mailbox", "allow", "example.com"), rule(2, "mailbox", "block", "other.com")]
    senders = [("envelope", "x@example.com"), ("from", "y@other.com")]
    assert lists.decide(tie, senders)[0].action == "block"


def test_match_says_which_sender_matched() -> None:
    match = lists.decide(
        [rule(1, "mailbox", "allow", "bank.no")],
        [("envelope", "bounce@mailer.net"), ("from", "post@bank.no")],
    )[0]
    assert (match.via, match.address) == ("from", "post@bank.no")


@given(st.text(max_size=400))
def test_normalize_never_fails_unexpectedly(text: str) -> None:
    try:
        canonical = lists.normalize(text)
    except lists.ListError:
        return
    assert canonical == lists.normalize(canonical)


def test_many_stars_match_in_linear_time() -> None:
    """A hostile pattern must not let a long sender address freeze the filter."""
    import time

    pattern = lists.normalize("a*a*a*a*a*a*a*a*a*a*a*a*a*a*@example.com")
    started = time.perf_counter()
    for n in (40, 300):
        assert lists.matches(pattern, "a" * n + "@example.com")
        assert not lists.matches(pattern, "a" * n + "@example.org")
    assert time.perf_counter() - started < 0.05


@given(
    st.text(alphabet="ab*", max_size=12).filter(lambda p: p.strip("*")),
    st.text(alphabet="ab", max_size=20),
)
def test_glob_agrees_with_fnmatch(local_pattern: str, local: str) -> None:
    import fnmatch

    expected = fnmatch.fnmatchcase(local, local_pattern)
    assert lists.matches(f"{local_pattern}@x.test", f"{local}@x.test") is expected
