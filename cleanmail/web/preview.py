"""Safe rendering of quarantined mail: cleaned HTML, attachment facts, owner-friendly values.

A message's HTML only ever reaches the browser through ``clean_html`` and only inside
the sandboxed preview document, whose own Content-Security-Policy forbids scripts,
remote loads (unless the owner asks for images), forms and plugins.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

import nh3
from babel.dates import format_datetime
from flask_babel import get_locale

from cleanmail import mime
from cleanmail.filter import attachments

MAX_HTML = 1024 * 1024  # characters of HTML cleaned per preview: bounds the work

# The preview document's own policy: no scripts, no remote loads, no forms, no framing
# except by our own page. The `sandbox` directive also covers a preview opened directly.
SANDBOX = "allow-popups allow-popups-to-escape-sandbox"
_POLICY = (
    "default-src 'none'; img-src {images}; style-src 'unsafe-inline'; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'; sandbox " + SANDBOX
)
CSP = _POLICY.format(images="data:")
CSP_IMAGES = _POLICY.format(images="https: http: data:")

TAGS = frozenset(
    "a abbr acronym address b bdi bdo big blockquote br caption center cite code col colgroup "
    "dd del dfn div dl dt em font h1 h2 h3 h4 h5 h6 hr i img ins kbd li mark ol p pre q s samp "
    "small span strike strong sub sup table tbody td tfoot th thead time tr tt u ul var wbr".split()
)
# Removed with everything inside them, not just their tags.
CONTENT_TAGS = frozenset(
    "script style template noscript title iframe frame frameset object embed applet svg math "
    "head textarea select option button".split()
)
_CELL = {"align", "valign", "width", "height", "colspan", "rowspan", "bgcolor", "nowrap"}
ATTRIBUTES = {
    "*": {"align", "dir", "lang", "title", "style"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height", "border"},
    "font": {"color", "face", "size"},
    "table": {"width", "border", "cellpadding", "cellspacing", "bgcolor", "summary"},
    "td": _CELL,
    "th": _CELL,
    "tr": {"valign", "bgcolor"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type", "reversed"},
    "li": {"value"},
    "ul": {"type"},
    "blockquote": {"cite"},
    "q": {"cite"},
}
# Style properties that cannot load anything; values are checked once more below.
STYLE_PROPERTIES = frozenset(
    "color background-color font font-family font-size font-style font-weight font-variant "
    "text-align text-decoration text-indent text-transform letter-spacing line-height "
    "white-space word-spacing vertical-align direction margin margin-top margin-right "
    "margin-bottom margin-left padding padding-top padding-right padding-bottom padding-left "
    "border border-top border-right border-bottom border-left border-color border-style "
    "border-width border-collapse border-spacing border-radius width height max-width "
    "min-width max-height min-height display list-style-type table-layout".split()
)
_COLOR_FUNCTION = re.compile(r"(?:rgba?|hsla?)\(", re.IGNORECASE)
_UNSAFE_STYLE = re.compile(r"[\\@<&]|/\*|expression|url|image", re.IGNORECASE)
_REMOTE_IMAGE = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE)

DOCUMENT = (
    '<!doctype html><html><head><meta charset="utf-8">'
    '<meta name="referrer" content="no-referrer">'
    "<style>body{{font-family:system-ui,sans-serif;margin:8px;color:#1b1f24;"
    "overflow-wrap:anywhere}}img{{max-width:100%;height:auto}}</style>"
    "</head><body>{body}</body></html>"
)


def _safe_style(value: str) -> str | None:
    """Keep only declarations whose values can load nothing and escape nothing."""
    kept = []
    for declaration in value.split(";"):
        _name, colon, rest = declaration.partition(":")
        if not colon:
            continue
        if _UNSAFE_STYLE.search(declaration):
            continue
        if "(" in _COLOR_FUNCTION.sub("", rest):
            continue
        kept.append(declaration.strip())
    return ";".join(kept) or None


def _attribute_filter(images: bool):
    def keep(tag: str, attribute: str, value: str) -> str | None:
        lowered = value.strip().lower()
        if attribute == "style":
            return _safe_style(value)
        if tag == "a" and attribute == "href":
            return value if lowered.startswith(("http:", "https:", "mailto:")) else None
        if tag == "img" and attribute == "src":
            if lowered.startswith("data:image/"):
                return value
            if images and lowered.startswith(("http:", "https:")):
                return value
            return None  # cid: and remote images stay blank
        return value

    return keep


@lru_cache(maxsize=2)
def _cleaner(images: bool) -> nh3.Cleaner:
    return nh3.Cleaner(
        tags=set(TAGS),
        clean_content_tags=set(CONTENT_TAGS),
        attributes={tag: set(names) for tag, names in ATTRIBUTES.items()},
        attribute_filter=_attribute_filter(images),
        strip_comments=True,
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        url_schemes={"http", "https", "mailto", "data"},
        url_relative="deny",
        filter_style_properties=set(STYLE_PROPERTIES),
    )


def clean_html(html: str, *, images: bool = False) -> str:
    """A message's HTML reduced to basic formatting: no scripts, handlers, forms or frames."""
    return _cleaner(images).clean(html[:MAX_HTML])


def document(html: str, *, images: bool = False) -> str:
    """The whole preview document around a message's cleaned HTML."""
    return DOCUMENT.format(body=clean_html(html, images=images))


def has_remote_images(html: str) -> bool:
    """True when the HTML refers to images on other servers (offer "Show images")."""
    return _REMOTE_IMAGE.search(html[:MAX_HTML]) is not None


@dataclass(frozen=True)
class Attachment:
    """An attachment as the owner sees it: name, what it really is, and its size."""

    name: str
    declared: str
    detected: str
    size: int


def attachment_list(parsed: mime.ParsedMessage) -> list[Attachment]:
    """Every part that is not body text, with libmagic's view of its decoded content."""
    found = []
    for part in parsed.parts:
        if part.is_body_text:
            continue
        data = part.payload
        found.append(Attachment(part.filename or "", part.content_type, detect(data), len(data)))
    return found


def detect(data: bytes) -> str:
    """libmagic's description of some content (what it is, whatever its name claims)."""
    if not data:
        return ""
    handles = attachments._handles()
    sample = data[: attachments.SAMPLE]
    mime_type = attachments._identify(handles.mime_type, sample)
    description = attachments._identify(handles.describe, sample)
    return mime.clean_text(f"{description} ({mime_type})" if mime_type else description, 300)


# Numeric dates as each language writes them; Babel's formatter costs ~60 µs a call,
# which on a 50-row list page was a third of the page.
_SHORT = {"nb": "%d.%m.%Y %H:%M", "da": "%d.%m.%Y %H.%M", "en": "%d/%m/%Y %H:%M"}
_DECIMAL_COMMA = {"nb", "da"}


def local_time(value: datetime | None, tz: ZoneInfo, style: str = "short") -> str:
    """A time in the owner's zone and language."""
    if value is None:
        return ""
    locale = get_locale()
    language = locale.language if locale else "nb"
    if style == "short" and language in _SHORT:
        return value.astimezone(tz).strftime(_SHORT[language])
    return format_datetime(value, style, tzinfo=tz, locale=locale)


def human_size(size: int) -> str:
    """A byte count as people read it: 512 B, 12 kB, 3.4 MB (3,4 MB in nb and da)."""
    if size < 1000:
        return f"{size} B"
    for unit, scale in (("kB", 1000), ("MB", 1000**2), ("GB", 1000**3)):
        if size < scale * 1000 or unit == "GB":
            value = size / scale
            shown = f"{value:.0f}" if value >= 10 else f"{value:.1f}"
            locale = get_locale()
            if locale is not None and locale.language in _DECIMAL_COMMA:
                shown = shown.replace(".", ",")
            return f"{shown} {unit}"
    return f"{size} B"  # pragma: no cover


def sender(from_header: str, fallback: str) -> tuple[str, str]:
    """The display name and address of a From header (the envelope sender when empty)."""
    header = from_header or ""
    # The common shapes first: "Name <a@b>" and "a@b"; parseaddr for everything else.
    if header.count("<") == 1 and header.endswith(">") and '"' not in header:
        name, _lt, address = header[:-1].partition("<")
        if "@" in address and " " not in address.strip():
            return name.strip(), address.strip()
    try:
        name, address = email.utils.parseaddr(header)
    except (RecursionError, ValueError, IndexError):
        # The package's parser recurses once per "(": a From of nested comments
        # would otherwise break the owner's whole list.
        name, address = "", ""
    if not address or "@" not in address:
        return (from_header or "").strip(), fallback
    return name.strip(), address
