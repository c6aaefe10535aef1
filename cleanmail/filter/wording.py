"""The wordlists of the rules engine: URL shorteners and spam phrases in en, nb and da."""

from __future__ import annotations

import re

_WORD = re.compile(r"[^\W_]+")

SHORTENERS = frozenset(
    "bit.ly tinyurl.com goo.gl t.co ow.ly is.gd buff.ly rebrand.ly cutt.ly tiny.cc shorturl.at "
    "rb.gy s.id t.ly v.gd bl.ink lnkd.in soo.gd clck.ru qr.ae x.co snip.ly short.io urlz.fr "
    "shorte.st adf.ly tiny.one hyperurl.co".split()
)

# Wording in English, Norwegian bokmål and Danish, matched on whole lower-case words.
PHRASES = {
    "call_to_action": (
        "click here|click below|click on the link|click this link|unsubscribe|to be removed|"
        "remove me|removal instructions|opt out|visit our website|to be taken off|off our list|"
        "remove in the subject|remove in subject|klikk her|trykk her|klikk på lenken|"
        "meld deg av|avmeld|avslutt abonnementet|klik her|tryk her|klik på linket|afmeld|"
        "frameld|meld dig fra"
    ),
    "money": (
        "make money|earn money|extra income|free money|credit card|mortgage rates|"
        "lower your mortgage|refinance|debt free|eliminate debt|consolidate|no credit check|"
        "investment opportunity|financial freedom|million dollars|risk free|100 free|money back|"
        "home based business|work from home|be your own boss|cash|earn|per week|per month|"
        "special offer|save up to|home loan|interest rate|bulk email|email addresses|mlm|"
        "multi level marketing|guaranteed|no risk|no cost|apply now|apply online|pre approved|"
        "lowest price|best price|dear friend|satisfaction guaranteed|tjen penger|ekstra inntekt|"
        "gratis penger|forbrukslån|lån uten sikkerhet|refinansier|lav rente|uten risiko|"
        "garantert|tjen penge|ekstra indkomst|gratis penge|kviklån|lån uden sikkerhed|"
        "uden risiko|garanteret"
    ),
    "pharma": (
        "viagra|cialis|levitra|pharmacy|prescription|lose weight|weight loss|diet pills|herbal|"
        "enlargement|penis|hgh|libido|erection|medication|vekttap|slankepiller|potensmidler|"
        "reseptfritt|vægttab|receptfri|potensmiddel|apotek uten resept|apotek uden recept"
    ),
    "lottery": (
        "you have won|you ve won|lottery|claim your prize|sweepstakes|you have been selected|"
        "next of kin|beneficiary|bank account|strictly confidential|business proposal|dear sir|"
        "congratulations you|du har vunnet|lotteri|gevinsten|premien|du har vundet|præmien|"
        "gratulerer du|tillykke du"
    ),
    "urgency": (
        "act now|limited time|urgent|order now|order today|call now|don t delay|do not delay|"
        "hurry|last chance|while supplies last|once in a lifetime|haster|begrenset tid|"
        "siste sjanse|bestill nå|skynd deg|kun i dag|begrænset tid|sidste chance|bestil nu|"
        "skynd dig"
    ),
    "claim": (
        "this is not spam|not unsolicited|you are receiving this|you received this|opt in|"
        "no obligation|100 legal|dette er ikke spam|det er ikke spam|uten forpliktelser|"
        "uden forpligtelser"
    ),
}


def trie(phrases: list[str]) -> str:
    """One alternation shaped as a prefix tree, which re scans far faster than a flat list."""
    root: dict = {}
    for phrase in phrases:
        node = root
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}  # a phrase ends here

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        return "(?:" + "|".join(branches) + (")?" if "" in node else ")")

    return emit(root)


FAMILY = {
    " ".join(_WORD.findall(phrase)): family
    for family, phrases in PHRASES.items()
    for phrase in phrases.split("|")
}
# Words are joined by single spaces, so " (...)(?= )" only matches whole words.
PHRASE = re.compile(" (" + trie(sorted(FAMILY)) + ")(?= )")

# Brands that phishing imitates most here, each with the names of its own registrable
# domains (without the suffix: "dhl" is dhl.com and dhl.de alike). Mail that names one
# in its sender's name or domain, or links to a look-alike host, from another domain
# impersonates it. Only names that are not everyday words ("outlook" is one).
BRANDS: dict[str, frozenset[str]] = {
    brand: frozenset(owners.split())
    for brand, owners in {
        "dnb": "dnb", "nordea": "nordea", "sparebank1": "sparebank1", "handelsbanken":
        "handelsbanken", "danskebank": "danskebank", "bankid": "bankid", "vipps": "vipps",
        "mobilepay": "mobilepay", "paypal": "paypal", "klarna": "klarna", "posten": "posten",
        "postnord": "postnord", "dhl": "dhl dpdhl", "fedex": "fedex", "ups": "ups",
        "microsoft": "microsoft office office365 outlook live microsoftonline sharepoint",
        "office365": "microsoft office office365 outlook microsoftonline",
        "sharepoint": "microsoft sharepoint",
        "onedrive": "microsoft onedrive live", "apple": "apple icloud", "icloud": "apple icloud",
        "netflix": "netflix", "amazon": "amazon", "google": "google", "metamask": "metamask",
        "coinbase": "coinbase", "binance": "binance", "norton": "norton nortonlifelock",
        "mcafee": "mcafee", "altinn": "altinn", "skatteetaten": "skatteetaten",
        "helsenorge": "helsenorge", "telenor": "telenor", "telia": "telia",
    }.items()
}  # fmt: skip

# Requests typical of phishing: confirm who you are, pay a small fee to get a parcel,
# save an account or password that is about to be lost. Deliberately not the wording of
# ordinary sign-up confirmations ("confirm your email") or password resets.
PHISHING = re.compile(
    " (?:"
    "verify your (?:identity|wallet|payment|details|information)|"
    "confirm your (?:identity|details|information|password|payment|delivery|wallet|address)|"
    "update your (?:payment|billing) (?:details|information|method)|"
    "(?:account|membership|mailbox|wallet|wallets|subscription) (?:has been|is|will be|are) "
    "(?:temporarily )?(?:suspended|limited|restricted|on hold|deactivated|locked)|"
    "password (?:expires|will expire|has expired)|keep (?:your )?current password|"
    "recovery phrase|seed phrase|unusual (?:activity|sign in)|"
    "(?:customs|delivery|redelivery|shipping) fee|reschedule (?:the )?delivery|"
    "bekreft (?:identiteten|kontoen|adressen|opplysningene|betalingen|leveringen)|"
    "kontoen (?:din )?(?:er|blir|vil bli) (?:midlertidig )?(?:stengt|sperret|begrenset)|"
    "uvanlig aktivitet|betale et gebyr|passordet (?:ditt )?utløper|"
    "bekræft (?:din|dit|dine|adressen|identiteten)|"
    "kontoen (?:er|bliver) (?:midlertidigt )?(?:spærret|lukket|begrænset)|"
    "betaling af told|adgangskoden udløber"
    ")(?= )"
)

# Sextortion: a bitcoin address beside several of these words.
EXTORTION = frozenset(
    "hacker hacked malware trojan virus camera webcam recorded video videos adult porn "
    "contacts police intimate embarrassing hacket kamera kontakter politiet".split()
)
