"""External engines' rule names as owners' reasons, in the owner's language."""

from __future__ import annotations

from cleanmail import reasons
from cleanmail.filter import symbols


def test_known_rules_share_our_codes_and_name_the_rule():
    (hit,) = symbols.to_hits("rspamd", [("MISSING_MID", 2.5)])
    assert (hit.code, hit.score) == ("MISSING_MESSAGE_ID", 2.5)
    assert hit.text == "no Message-ID header (rspamd: MISSING_MID)"


def test_families_by_prefix():
    assert symbols.code_for("BAYES_99") == "ENGINE_BAYES_SPAM"
    assert symbols.code_for("BAYES_00") == symbols.GENERIC  # and it lowers the score anyway
    assert symbols.code_for("RCVD_IN_SBL") == "ENGINE_BLOCKLISTED"
    assert symbols.code_for("DMARC_POLICY_REJECT") == "ENGINE_AUTH_FAIL"
    assert symbols.code_for("DATE_IN_PAST_12_24") == "DATE_IN_PAST"
    assert symbols.code_for("ADVANCE_FEE_4_NEW") == "ENGINE_FRAUD"


def test_unknown_rules_fall_into_one_generic_reason_and_lowering_rules_are_dropped():
    hits = symbols.to_hits(
        "spamassassin",
        [("ODD_RULE_A", 1.0), ("ODD_RULE_B", 0.5), ("MIME_GOOD", -0.1), ("NO_RELAYS", 0.0)],
    )
    (generic,) = hits
    assert generic.code == "ENGINE_RULE"
    assert generic.score == 1.5
    assert generic.text == "other spam signs (spamassassin: ODD_RULE_A, ODD_RULE_B)"


def test_reasons_are_ordered_by_weight_and_long_lists_are_cut():
    rules = [(f"ODD_{n:02}", 0.1) for n in range(12)] + [("GTUBE", 0.0), ("R_SPF_FAIL", 3.0)]
    hits = symbols.to_hits("rspamd", rules)
    assert [hit.code for hit in hits] == ["ENGINE_AUTH_FAIL", "ENGINE_RULE", "GTUBE"]
    assert hits[1].text.endswith("ODD_07 and 4 more)")


def test_engine_reasons_are_shown_in_the_owners_language(app):
    hit = symbols.to_hits("rspamd", [("R_SUSPICIOUS_URL", 5.0)])[0]
    stored = {"code": hit.code, "text": hit.text, "score": hit.score}
    shown = {}
    for language in ("nb", "da", "en"):
        with app.test_request_context(headers={"Accept-Language": language}):
            shown[language] = reasons.describe(stored)
    assert shown == {
        "nb": "En lenke ser mistenkelig ut",
        "da": "Et link ser mistænkeligt ud",
        "en": "A link looks suspicious",
    }
    with app.test_request_context(headers={"Accept-Language": "nb"}):
        unavailable = reasons.describe({"code": "ENGINE_UNAVAILABLE", "text": "rspamd unavailable"})
    assert unavailable.startswith("En ekstra spamsjekk var utilgjengelig")
