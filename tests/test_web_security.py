"""Findings of the security review, kept fixed: HTTPS forms, huge ids and dates, NUL bytes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from cleanmail.web import create_app
from tests.conftest import login_as


def token(client, path: str = "/login", **headers) -> str:
    page = client.get(path, headers=headers).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def test_forms_work_over_https_behind_a_proxy(config, owner):
    """Flask-WTF wants a same-origin Referer over HTTPS; the pages must let browsers send it."""
    secure = dataclasses.replace(config, base_url="https://mail.example.no", trusted_proxies=1)
    app = create_app(secure)
    try:
        client = app.test_client()
        proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mail.example.no"}
        page = client.get("/login", headers=proxy)
        assert page.headers["Referrer-Policy"] == "same-origin"
        assert '<meta name="referrer" content="same-origin">' in page.get_data(as_text=True)
        assert "Secure" in page.headers.get("Set-Cookie", "Secure")
        sent = client.post(
            "/link",
            data={"csrf_token": token(client, **proxy), "address": "ola@example.no"},
            headers={**proxy, "Referer": "https://mail.example.no/login"},
        )
        assert sent.status_code == 200
    finally:
        app.extensions["cleanmail.db"].dispose()


@pytest.mark.parametrize(
    "path",
    [
        "/messages/99999999999999999999",
        "/messages/9223372036854775808/preview",
        "/?until=9999-12-31",
        "/?since=0001-01-01",
        "/?before=1-9223372036854775808",
        "/?q=%00%00",
    ],
)
def test_extreme_input_is_not_an_error(client, owner, path):
    login_as(client, owner)
    assert client.get(path).status_code in (200, 404)


def test_huge_bulk_ids_and_nul_addresses_are_refused_cleanly(client, owner):
    login_as(client, owner)
    bulk = client.post(
        "/messages/bulk",
        data={"csrf_token": token(client, "/"), "action": "delete", "ids": "9223372036854775808"},
    )
    assert bulk.status_code == 400
    client.post("/logout", data={"csrf_token": token(client, "/")})
    form = {"csrf_token": token(client), "address": "ola\x00@example.no", "password": "x"}
    assert client.post("/login", data=form).status_code in (200, 400)
    form = {"csrf_token": token(client), "address": "ola\x00@example.no"}
    assert client.post("/link", data=form).status_code == 400
