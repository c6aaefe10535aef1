"""The console's audit log, statistics and API-token pages."""

from __future__ import annotations

import csv
import io
import re

from sqlalchemy import select

from cleanmail import apitokens, audit, stats
from cleanmail.models import ApiToken
from tests.conftest import login_as
from tests.test_console import login_staff, make_staff, token

ACTOR = audit.Actor("operator", "test")


def test_audit_log_filters_and_exports_csv(client, database, two_domains):
    member = make_staff(database, "root@provider.example", "operator")
    with database.session_scope(write=True) as session:
        audit.record(
            session,
            audit.Actor("owner", "mette@other.dk", "192.0.2.9"),
            "list.allow",
            mailbox_id=two_domains["box:mette@other.dk"],
            pattern="<script>alert(1)</script>",
        )
    login_staff(client, member)
    page = client.get("/console/audit?actor=owner").get_data(as_text=True)
    assert "list.allow" in page and "mette@other.dk" in page and "192.0.2.9" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    assert "mailbox.add" not in page
    assert "mailbox.add" in client.get("/console/audit?action=mailbox.").get_data(as_text=True)
    none = client.get("/console/audit?since=2099-01-01").get_data(as_text=True)
    assert "No event matches." in none
    bad = client.get("/console/audit?since=yesterday").get_data(as_text=True)
    assert "Write dates like 2026-11-22." in bad
    exported = client.get("/console/audit.csv?mailbox=mette")
    assert exported.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in exported.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(exported.get_data(as_text=True))))
    assert rows[0][4] == "action"
    assert {row[5] for row in rows[1:]} == {"mette@other.dk"}
    assert "list.allow" in {row[4] for row in rows[1:]}


def test_a_domain_admin_sees_only_their_domains_in_the_audit_log(client, database, two_domains):
    admin = make_staff(database, "anne@example.no", "domain_admin", ("example.no",))
    login_staff(client, admin)
    page = client.get("/console/audit").get_data(as_text=True)
    assert "ola@example.no" in page and "mette@other.dk" not in page
    exported = client.get("/console/audit.csv").get_data(as_text=True)
    assert "ola@example.no" in exported and "mette@other.dk" not in exported


def test_statistics_page_draws_charts_without_scripts(client, database, two_domains):
    member = make_staff(database, "root@provider.example", "operator")
    with database.session_scope(write=True) as session:
        stats.add(
            session,
            {
                (stats.today(), "example.no", "scanned"): 30,
                (stats.today(), "example.no", "passed"): 20,
                (stats.today(), "example.no", "quarantined"): 10,
                (stats.today(), "other.dk", "quarantined"): 5,
                (stats.today(), "example.no", "reports_sent"): 3,
                (stats.today(), "example.no", "reports_failed"): 1,
                (stats.today(), "example.no", stats.reason_counter("SUBJECT_CAPS")): 10,
            },
        )
    login_staff(client, member)
    response = client.get("/console/stats?days=30")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "<svg" in page and "<script" not in page.split("<main", 1)[-1]
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "Held: 15." in page and "Passed: 20." in page
    assert len(re.findall(r"<rect x=", page)) >= 4  # passed, held, sent, failed bars
    assert "75.0 %" in page  # 3 of 4 report attempts went through
    assert "SUBJECT_CAPS" in page and "supplier.no" in page
    one = client.get("/console/stats?days=30&domain=other.dk").get_data(as_text=True)
    assert "Held: 5." in one
    assert client.get("/console/stats?domain=nowhere.example").status_code == 404


def test_a_domain_admin_gets_statistics_of_their_domains_only(client, database, two_domains):
    admin = make_staff(database, "anne@example.no", "domain_admin", ("example.no",))
    with database.session_scope(write=True) as session:
        stats.bump(session, "quarantined", "example.no", 2)
        stats.bump(session, "quarantined", "other.dk", 40)
    login_staff(client, admin)
    page = client.get("/console/stats").get_data(as_text=True)
    assert "Held: 2." in page and "other.dk" not in page
    assert client.get("/console/stats?domain=other.dk").status_code == 404


def test_operators_make_and_revoke_api_tokens(client, database, two_domains):
    member = make_staff(database, "root@provider.example", "operator")
    login_staff(client, member)
    csrf = token(client, "/console/tokens")
    made = client.post(
        "/console/tokens", data={"csrf_token": csrf, "name": "helpdesk", "domain": ["other.dk"]}
    )
    page = made.get_data(as_text=True)
    secret = re.search(r"(cm_[A-Za-z0-9_-]{20,})", page).group(1)
    assert "shown only this once" in page
    assert "cm_" not in client.get("/console/tokens").get_data(as_text=True).replace(
        secret[:10], ""
    )
    api = {"Authorization": f"Bearer {secret}"}
    assert client.get("/api/v1/mailboxes", headers=api).status_code == 200
    with database.session_scope() as session:
        stored = session.scalar(select(ApiToken).where(ApiToken.name == "helpdesk"))
        assert stored.domains == ["other.dk"]
        assert stored.token_hash == apitokens.hash_secret(secret)
    refused = client.post("/console/tokens", data={"csrf_token": csrf, "name": "bad name!"})
    assert refused.status_code == 400
    revoked = client.post("/console/tokens/revoke", data={"csrf_token": csrf, "name": "helpdesk"})
    assert "no longer works" in revoked.get_data(as_text=True)
    assert client.get("/api/v1/mailboxes", headers=api).status_code == 401
    assert client.post("/console/tokens", data={"name": "x"}).status_code == 400  # no CSRF


def test_owners_and_domain_admins_cannot_manage_tokens(client, database, two_domains, owner=None):
    admin = make_staff(database, "anne@example.no", "domain_admin", ("example.no",))
    login_staff(client, admin)
    assert client.get("/console/tokens").status_code == 403
    with database.session_scope() as session:
        from cleanmail.models import Mailbox

        ola = session.scalar(select(Mailbox).where(Mailbox.address == "ola@example.no"))
    client.get("/logout")
    login_as(client, ola)
    assert client.get("/console/stats").status_code == 403
    assert client.get("/console/audit").status_code == 403
