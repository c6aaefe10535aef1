"""External engines' rule names (rspamd symbols, SpamAssassin rules) as Cleanmail reasons.

Owners never see a name like ``R_SUSPICIOUS_URL``: the common rules map to one of our
reason codes, which the web app shows in the owner's language (cleanmail/reasons.py);
where a rule means the same as one of our own rules it shares that rule's code. Every
other rule that added to the score falls into one generic reason that still names the
rules for operators. Rules that lowered the score are not reasons.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cleanmail.filter.engines import Hit

GENERIC = "ENGINE_RULE"
MAX_NAMES = 8  # rule names kept in one reason's text

# code -> the English text stored with the reason (the web app translates by code).
TEXTS = {
    "GTUBE": "GTUBE spam test pattern",
    "MISSING_DATE": "no Date header",
    "MISSING_MESSAGE_ID": "no Message-ID header",
    "MISSING_FROM": "no usable From address",
    "DATE_IN_FUTURE": "dated in the future",
    "DATE_IN_PAST": "dated long before it arrived",
    "SUBJECT_CAPS": "subject mostly in capitals",
    "HTML_ONLY": "HTML only, no plain text",
    "HTML_IMAGE_ONLY": "mostly images",
    "LINK_TO_IP": "link to a bare IP address",
    "FROM_DISPLAY_SPOOF": "sender name shows another address",
    "TO_UNDISCLOSED": "recipients hidden",
    "BASE64_TEXT": "base64-encoded text",
    "ENGINE_BAYES_SPAM": "resembles spam learned before",
    "ENGINE_PHISHING": "link looks like phishing",
    "ENGINE_AUTH_FAIL": "SPF, DKIM or DMARC failed",
    "ENGINE_BLOCKLISTED": "sender or link on a blocklist",
    "ENGINE_RISKY_ATTACHMENT": "risky attachment type",
    "ENGINE_FORGED": "forged headers",
    "ENGINE_SUSPICIOUS_LINK": "suspicious link",
    "ENGINE_FRAUD": "looks like fraud",
    "ENGINE_BULK": "bulk mail from a bad sender",
    GENERIC: "other spam signs",
}

# Exact names, rspamd's and SpamAssassin's side by side where they differ.
_EXACT = {
    "GTUBE": "GTUBE",
    "MISSING_DATE": "MISSING_DATE",
    "MISSING_MID": "MISSING_MESSAGE_ID",
    "MISSING_FROM": "MISSING_FROM",
    "FROM_EXCESS_BASE64": "BASE64_TEXT",
    "MIME_BASE64_TEXT": "BASE64_TEXT",
    "DATE_IN_FUTURE": "DATE_IN_FUTURE",
    "DATE_IN_PAST": "DATE_IN_PAST",
    "SUBJ_ALL_CAPS": "SUBJECT_CAPS",
    "MIME_HTML_ONLY": "HTML_ONLY",
    "HTML_SHORT_LINK_IMG_1": "HTML_IMAGE_ONLY",
    "HTML_SHORT_LINK_IMG_2": "HTML_IMAGE_ONLY",
    "HTTP_TO_IP": "LINK_TO_IP",
    "NUMERIC_HTTP_ADDR": "LINK_TO_IP",
    "SPOOF_DISPLAY_NAME": "FROM_DISPLAY_SPOOF",
    "FROM_NEQ_DISPLAY_NAME": "FROM_DISPLAY_SPOOF",
    "R_UNDISC_RCPT": "TO_UNDISCLOSED",
    "UNDISC_RECIPS": "TO_UNDISCLOSED",
    "BAYES_SPAM": "ENGINE_BAYES_SPAM",
    "PHISHING": "ENGINE_PHISHING",
    "R_SPF_FAIL": "ENGINE_AUTH_FAIL",
    "R_SPF_SOFTFAIL": "ENGINE_AUTH_FAIL",
    "R_DKIM_REJECT": "ENGINE_AUTH_FAIL",
    "SPF_FAIL": "ENGINE_AUTH_FAIL",
    "SPF_SOFTFAIL": "ENGINE_AUTH_FAIL",
    "DKIM_INVALID": "ENGINE_AUTH_FAIL",
    "FORGED_SENDER": "ENGINE_FORGED",
    "FORGED_RECIPIENTS": "ENGINE_FORGED",
    "R_SUSPICIOUS_URL": "ENGINE_SUSPICIOUS_LINK",
    "R_SUSPICIOUS_IMAGES": "ENGINE_SUSPICIOUS_LINK",
    "SUSPICIOUS_RECIPS": "ENGINE_FORGED",
    "MIME_BAD_EXTENSION": "ENGINE_RISKY_ATTACHMENT",
    "MIME_DOUBLE_BAD_EXTENSION": "ENGINE_RISKY_ATTACHMENT",
    "MIME_BAD_ATTACHMENT": "ENGINE_RISKY_ATTACHMENT",
    "MIME_ARCHIVE_IN_ARCHIVE": "ENGINE_RISKY_ATTACHMENT",
    "LOTS_OF_MONEY": "ENGINE_FRAUD",
}

# Families of rules by prefix (checked in order, after the exact names).
_PREFIXES = (
    (re.compile(r"^BAYES_(?:[6-9]\d|99\d?)$"), "ENGINE_BAYES_SPAM"),
    (re.compile(r"^(?:PHISH|PHISHED_|SPOOFED_)"), "ENGINE_PHISHING"),
    (
        re.compile(r"^(?:DMARC_POLICY_(?:REJECT|QUARANTINE|SOFTFAIL)|DMARC_(?:REJECT|QUAR))"),
        "ENGINE_AUTH_FAIL",
    ),
    (
        re.compile(r"^(?:RBL_|RCVD_IN_|URIBL_|DBL_|SURBL_|SEM_|ABUSE_SURBL|SPAMHAUS_|MSBL_)"),
        "ENGINE_BLOCKLISTED",
    ),
    (re.compile(r"^DATE_IN_FUTURE_"), "DATE_IN_FUTURE"),
    (re.compile(r"^DATE_IN_PAST_"), "DATE_IN_PAST"),
    (re.compile(r"^HTML_IMAGE_ONLY_"), "HTML_IMAGE_ONLY"),
    (re.compile(r"^(?:FORGED_|FAKE_)"), "ENGINE_FORGED"),
    (
        re.compile(r"^(?:ADVANCE_FEE_|FILL_THIS_FORM|FREEMAIL_FORGED|MONEY_|LOTTO_|NIGERIAN_)"),
        "ENGINE_FRAUD",
    ),
    (re.compile(r"^(?:MIME_BAD_|MIME_EXE_|MIME_ENCRYPTED_ARCHIVE)"), "ENGINE_RISKY_ATTACHMENT"),
    (re.compile(r"^(?:DCC_|RAZOR2_|PYZOR_|FUZZY_DENIED)"), "ENGINE_BULK"),
)


def code_for(rule: str) -> str:
    """Our reason code for an external rule name (the generic code when unknown)."""
    code = _EXACT.get(rule)
    if code is not None:
        return code
    for pattern, family in _PREFIXES:
        if pattern.search(rule):
            return family
    return GENERIC


def to_hits(engine: str, rules: Iterable[tuple[str, float]]) -> tuple[Hit, ...]:
    """Reasons from an engine's ``(rule, score)`` pairs: one per code, the strongest first.

    Only rules that raised the score count, GTUBE always; rules that share a code are
    summed into one reason whose text names them, as in ``"resembles spam learned
    before (rspamd: BAYES_SPAM)"``.
    """
    scores: dict[str, float] = {}
    names: dict[str, list[str]] = {}
    for rule, score in rules:
        if score <= 0 and rule != "GTUBE":
            continue
        code = code_for(rule)
        scores[code] = scores.get(code, 0.0) + score
        names.setdefault(code, []).append(rule)
    hits = []
    for code, score in sorted(scores.items(), key=lambda item: -item[1]):
        listed = sorted(names[code], key=str)[:MAX_NAMES]
        more = len(names[code]) - len(listed)
        detail = ", ".join(listed) + (f" and {more} more" if more > 0 else "")
        hits.append(Hit(code, round(score, 2), f"{TEXTS[code]} ({engine}: {detail})"))
    return tuple(hits)
