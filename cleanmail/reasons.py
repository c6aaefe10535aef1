"""Why a message was held, in words a mailbox owner understands, in the owner's language.

The filter stores each reason as ``{"code", "text", "score"}`` with an English text;
here the code picks a translated text, and the few reasons that name something (a
list pattern, an attachment) take that detail from the stored text. Unknown codes
fall back to the stored English text.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from flask_babel import get_locale
from flask_babel import lazy_gettext as _l

# Reasons that decide on their own whatever the score: shown before the scored ones.
DECISIVE = (
    "LIST_BLOCK_MAILBOX",
    "LIST_BLOCK_DOMAIN",
    "LIST_BLOCK_GLOBAL",
    "BLOCKED_ATTACHMENT",
    "GTUBE",
    "MANUAL",
)

# One short label per code: the whole description of a plain reason, and the name of
# every reason in the list's filter.
LABELS = {
    "LIST_BLOCK_MAILBOX": _l("The sender is on your blacklist"),
    "LIST_BLOCK_DOMAIN": _l("The sender is blocked for your whole domain"),
    "LIST_BLOCK_GLOBAL": _l("The sender is blocked by your mail provider"),
    "LIST_ALLOW": _l("The sender is on your whitelist"),
    "ALLOW_IGNORED_SPOOFED": _l("Whitelist ignored: the sender's address looks forged"),
    "BLOCKED_ATTACHMENT": _l("Blocked attachment"),
    "MANUAL": _l("Put in the quarantine by your mail provider"),
    "GTUBE": _l("Known spam test pattern (GTUBE)"),
    "MISSING_DATE": _l("The message has no date"),
    "MISSING_MESSAGE_ID": _l("The message has no message ID"),
    "MISSING_FROM": _l("The sender address is missing or unreadable"),
    "DATE_IN_FUTURE": _l("The message is dated in the future"),
    "DATE_IN_PAST": _l("The message is dated days before it arrived"),
    "DATE_BAD_ZONE": _l("The message date has an impossible time zone"),
    "DATE_MALFORMED": _l("The message date is not written the way mail programs write it"),
    "SUBJECT_CAPS": _l("The subject is mostly capital letters"),
    "SUBJECT_SHOUTING": _l("The subject has many !!! or $$$"),
    "SUBJECT_TRACKING_ID": _l("The subject ends in a tracking number"),
    "MSGID_NO_DOMAIN": _l("The message ID has no proper domain"),
    "FORGED_MSGID": _l("The mail program named in the headers looks forged"),
    "MANY_RECIPIENTS": _l("The message is addressed to many people"),
    "TO_UNDISCLOSED": _l("The recipients are hidden"),
    "FROM_DISPLAY_SPOOF": _l("The sender name shows a different address"),
    "FROM_ENDS_IN_NUMS": _l("The sender address ends in many digits"),
    "DUPLICATE_HEADERS": _l("The message repeats headers that must appear once"),
    "HIGH_PRIORITY": _l("The message is marked as high priority"),
    "MIME_DEFECTS": _l("The message structure is malformed"),
    "CJK_CHARSET": _l("The message uses an East Asian character set"),
    "LINK_TO_IP": _l("A link points to a bare IP address"),
    "LINK_SHORTENER": _l("A link uses a URL shortener that hides its target"),
    "LINK_TEXT_MISMATCH": _l("A link shows one site but goes to another"),
    "HTML_ONLY": _l("The message is HTML only"),
    "HTML_LITTLE_TEXT": _l("The HTML-only message has very little text"),
    "HTML_IMAGE_ONLY": _l("The message is mostly images"),
    "HTML_HIDDEN_TEXT": _l("The message contains hidden or tiny text"),
    "HTML_BIG_FONT": _l("The message uses very large letters"),
    "HTML_SCRIPT": _l("The message contains scripts"),
    "HTML_FORM": _l("The message contains a form to fill in"),
    "HTML_FRAME": _l("The message embeds other pages or objects"),
    "BASE64_TEXT": _l("The text of the message is base64-encoded"),
    "BRAND_IMPERSONATION": _l("The sender or a link imitates a well-known company"),
    "PHISHING_WORDING": _l("Asks to confirm an identity, pay a fee or save an account"),
    "BITCOIN_EXTORTION": _l("Demands bitcoin with threats"),
    "HTML_ATTACHMENT": _l("An attached web page"),
    "HTML_ATTACHMENT_ACTIVE": _l("An attached web page runs a script or asks for input"),
    "DOUBLE_EXTENSION": _l("An attachment hides its real type behind a second extension"),
    "BODY_CAPS": _l("Much of the text is in capital letters"),
    "BODY_EXCLAIM": _l("The text has many exclamation marks"),
    "MONEY_AMOUNTS": _l("The text mentions many money amounts"),
    "SPAM_PHRASES": _l("Typical spam wording with a call to click"),
    "SPAM_PHRASES_MANY": _l("Much typical spam wording"),
    "CLASSIFIER_WORDING": _l("Wording known from spam"),
    "CLASSIFIER_HEADERS": _l("The headers look like those of known spam"),
    "CLASSIFIER_LINKS": _l("Links to sites known from spam"),
    "CLASSIFIER_LAYOUT": _l("Built like known spam"),
    "CLASSIFIER_HAM": _l("Resembles mail that people wanted"),
}

# The external engines' reasons (cleanmail/filter/symbols.py maps their rule names here).
LABELS.update(
    {
        "ENGINE_BAYES_SPAM": _l("Resembles spam the filter has learned"),
        "ENGINE_PHISHING": _l(
            "A link looks like an attempt to steal passwords or card details (phishing)"
        ),
        "ENGINE_AUTH_FAIL": _l("The sender's domain does not confirm that it sent this message"),
        "ENGINE_BLOCKLISTED": _l("The sender or a link is on a public spam blocklist"),
        "ENGINE_RISKY_ATTACHMENT": _l("An attachment has a risky file type"),
        "ENGINE_FORGED": _l("The information in the message header looks forged"),
        "ENGINE_SUSPICIOUS_LINK": _l("A link looks suspicious"),
        "ENGINE_FRAUD": _l("The message looks like an attempt at fraud"),
        "ENGINE_BULK": _l("Sent in bulk by a sender known for spam"),
        "ENGINE_RULE": _l("Other signs of spam found by the spam filter"),
        "ENGINE_UNAVAILABLE": _l(
            "An extra spam check was unavailable, so the message was checked less thoroughly"
        ),
    }
)

# Reasons whose stored text ends in a detail after a fixed English prefix.
_DETAILED = {
    "LIST_BLOCK_MAILBOX": (
        "sender blocked by you: ",
        _l("The sender is on your blacklist (%(detail)s)"),
    ),
    "LIST_BLOCK_DOMAIN": (
        "sender blocked for your domain: ",
        _l("The sender is blocked for your whole domain (%(detail)s)"),
    ),
    "LIST_BLOCK_GLOBAL": (
        "sender blocked for everyone: ",
        _l("The sender is blocked by your mail provider (%(detail)s)"),
    ),
    "LIST_ALLOW": ("sender allowed: ", _l("The sender is on your whitelist (%(detail)s)")),
    "CLASSIFIER_WORDING": ("known spam wording: ", _l("Wording known from spam (%(detail)s)")),
    "ALLOW_IGNORED_SPOOFED": (
        "allow entry ",
        _l("Your whitelist entry %(detail)s was ignored: the sender's address looks forged"),
    ),
}
_ATTACHMENT_PREFIX = "blocked attachment "
_BLOCKED_NAME = _l("The attachment %(detail)s has a blocked file type")
_BLOCKED_CONTENT = _l("The attachment %(detail)s contains a program or other blocked content")


def codes() -> list[tuple[str, str]]:
    """Every known code with its label in the current language, for the reason filter."""
    return _codes(str(get_locale()))


@lru_cache(maxsize=8)
def _codes(locale: str) -> list[tuple[str, str]]:
    # The catalogs do not change while the app runs, so one list per language will do.
    return [(code, str(label)) for code, label in LABELS.items()]


def describe(reason: dict[str, Any]) -> str:
    """One reason in the owner's language (the stored English text for unknown codes)."""
    code = str(reason.get("code") or "")
    text = str(reason.get("text") or "")
    if code == "BLOCKED_ATTACHMENT":
        return _attachment(text)
    if code in _DETAILED:
        prefix, template = _DETAILED[code]
        if text.startswith(prefix) and len(text) > len(prefix):
            detail = text[len(prefix) :]
            if code == "ALLOW_IGNORED_SPOOFED":
                detail = detail.partition(" ignored:")[0]
            return str(template) % {"detail": detail}
    label = LABELS.get(code)
    if label is not None:
        return str(label)
    return text or code


def _attachment(text: str) -> str:
    """A blocked attachment: "blocked attachment NAME: blocked file name .exe" and kin."""
    if not text.startswith(_ATTACHMENT_PREFIX):
        return str(LABELS["BLOCKED_ATTACHMENT"])
    name, sep, why = text[len(_ATTACHMENT_PREFIX) :].rpartition(": blocked ")
    if not sep:
        return str(LABELS["BLOCKED_ATTACHMENT"])
    template = _BLOCKED_NAME if why.startswith("file name") else _BLOCKED_CONTENT
    return str(template) % {"detail": name}


def top(reasons: Iterable[dict[str, Any]], count: int | None = 2) -> list[dict[str, Any]]:
    """The reasons that matter most: the deciding ones first, then by score."""

    def weight(reason: dict[str, Any]) -> tuple[int, float]:
        decisive = reason.get("code") in DECISIVE
        try:
            score = float(reason.get("score") or 0)
        except (TypeError, ValueError):
            score = 0.0
        return (0 if decisive else 1, -score)

    valid = [reason for reason in reasons if isinstance(reason, dict)]
    return sorted(valid, key=weight)[:count]
