"""The operators' console: who gets in, what each member of staff sees, and what they do."""

from __future__ import annotations

import email
import email.policy
import re
import time

import pyotp
import pytest
from sqlalchemy import func, select

from cleanmail import audit, bulk, search, staff
from cleanmail.models import (
    AuditEvent,
    BulkJob,
    BulkStatus,
    Domain,
    ListEntry,
    Mailbox,
    Message,
    Report,
    ReportStatus,
    Status,
)
from cleanmail.web import auth
from tests.conftest import login_as

ACTOR = audit.Actor("operator", "test")
PASSWORD = "Secret123"
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


@pytest.fixture(autouse=True)
def _fast_failures(monkeypatch):
    monkeypatch.setattr(auth, "FAILURE_DELAY", 0)


def make_staff(database, address, role, domains=(), *, secret=SECRET):
    """A member of staff with a password and (unless secret is None) two-step login on."""
    with database.session_scope(write=True) as session:
        member = staff.add(session, ACTOR, address, role, password=PASSWORD, domains=domains)
        member.totp_secret = secret
        member.language = "en"
        session.flush()
        return member


def login_staff(client, member) -> None:
    """Log a test client in as staff who passed both steps."""
    login_as(client, member)
    with client.session_transaction() as session:
        session["login_method"] = "totp"


def token(client, path="/console/"):
    page = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def status_of(database, message_id):
    with database.session_scope() as session:
        return session.get(Message, message_id).status


@pytest.fixture
def operator(database, two_domains):
    return make_staff(database, "root@provider.example", "operator")


@pytest.fixture
def admin(database, two_domains):
    """A domain admin of example.no only."""
    return make_staff(database, "anne@example.no", "domain_admin", ("example.no",))


# Getting in.


def test_owner_cannot_reach_the_console(client, two_domains, database):
    with database.session_scope() as session:
        ola = session.get(Mailbox, two_domains["box:ola@example.no"])
    login_as(client, ola)
    with client.session_transaction() as session:
        session["login_method"] = "totp"
    for path in ("/console/", "/console/mailboxes", f"/console/messages/{two_domains['invoice']}"):
        assert client.get(path).status_code == 403
    assert client.get("/").status_code == 200  # their own quarantine still works


def test_console_needs_a_login(client, two_domains):
    response = client.get("/console/?sender=x.no")
    assert response.status_code == 302
    assert "/login?next=" in response.headers["Location"]


def _login(client, address, password=PASSWORD):
    return client.post(
        "/login",
        data={"csrf_token": token(client, "/login"), "address": address, "password": password},
    )


def test_staff_must_enrol_two_step_login_before_the_console(client, database, two_domains):
    make_staff(database, "new@provider.example", "operator", secret=None)
    response = _login(client, "new@provider.example")
    assert response.headers["Location"].endswith("/console/")  # staff land in the console
    response = client.get("/console/")
    assert response.status_code == 302 and response.headers["Location"].endswith(
        "/settings/two-step"
    )
    page = client.get("/settings/two-step").get_data(as_text=True)
    secret = re.search(r'id="totp-secret">([^<]+)<', page).group(1).replace(" ", "")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post(
        "/settings/two-step/enable",
        data={"csrf_token": csrf, "code": pyotp.TOTP(secret).now()},
    )
    assert response.status_code == 200 and "recovery" in response.get_data(as_text=True)
    assert client.get("/console/").status_code == 200
    # Staff cannot turn it off again.
    csrf = token(client, "/settings/two-step")
    response = client.post(
        "/settings/two-step/disable", data={"csrf_token": csrf, "code": pyotp.TOTP(secret).now()}
    )
    assert response.status_code == 403
    with database.session_scope() as session:
        member = session.scalar(select(Mailbox).where(Mailbox.address == "new@provider.example"))
        assert member.totp_secret == secret


def test_staff_log_in_with_password_and_code(client, database, operator):
    response = _login(client, operator.address)
    assert response.headers["Location"].endswith("/login/totp")
    assert client.get("/console/").status_code == 302  # not in yet
    csrf = token(client, "/login/totp")
    response = client.post(
        "/login/totp", data={"csrf_token": csrf, "code": pyotp.TOTP(SECRET).now()}
    )
    assert response.headers["Location"].endswith("/console/")
    assert client.get("/console/").status_code == 200


def test_a_report_link_is_not_enough_for_the_console(client, database, operator):
    login_as(client, operator)  # login_as marks the session as a link login
    response = client.get("/console/")
    assert response.status_code == 401
    assert "password and a code" in response.get_data(as_text=True)


# Searching and acting.


def test_search_finds_and_pages(client, operator, two_domains):
    login_staff(client, operator)
    page = client.get("/console/?sender=invoice@supplier.no").get_data(as_text=True)
    assert page.count('name="ids"') == 3
    assert "mette@other.dk" in page and "per@example.no" in page
    page = client.get("/console/?subject=autumn&status=any").get_data(as_text=True)
    assert "Big autumn SALE" in page and page.count('name="ids"') == 1
    response = client.get("/console/?since=2026-13-01&min=abc")
    assert response.status_code == 400
    assert "not understood" in response.get_data(as_text=True)
    response = client.get("/console/?recipient=not%20valid@")
    assert response.status_code == 400


def test_operator_releases_one_message_for_a_customer(
    client, operator, two_domains, database, smtp_sink
):
    login_staff(client, operator)
    message_id = two_domains["mette"]
    page = client.get(f"/console/messages/{message_id}").get_data(as_text=True)
    assert "All headers" in page and "Message-ID" in page and "SUBJECT_CAPS" in page
    csrf = token(client, f"/console/messages/{message_id}")
    response = client.post(
        f"/console/messages/{message_id}/release",
        data={"csrf_token": csrf},
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert response.status_code == 302
    (received,) = smtp_sink.wait_for(1)
    assert received.rcpt_tos == ["mette@other.dk"]
    assert b"X-Cleanmail-Released: by operator" in received.data
    with database.session_scope() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "message.release"))
        assert (event.actor_type, event.actor, event.remote_addr) == (
            "operator",
            "root@provider.example",
            "192.0.2.7",
        )


def test_refused_release_is_shown_and_kept(client, operator, two_domains, database, smtp_sink):
    login_staff(client, operator)
    smtp_sink.refuse = "451 4.3.0 busy"
    message_id = two_domains["invoice"]
    csrf = token(client)
    client.post(f"/console/messages/{message_id}/release", data={"csrf_token": csrf})
    page = client.get(f"/console/messages/{message_id}").get_data(as_text=True)
    assert "did not go through" in page and "451 4.3.0 busy" in page
    assert status_of(database, message_id) == Status.NEW


def test_raw_download_is_for_operators_only(client, operator, admin, two_domains, store, database):
    message_id = two_domains["invoice"]
    with database.session_scope() as session:
        sha = session.get(Message, message_id).raw_sha256
    login_staff(client, operator)
    response = client.get(f"/console/messages/{message_id}/raw")
    assert response.status_code == 200
    assert response.data == store.read(sha)
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["Content-Type"] == "application/octet-stream"
    login_staff(client, admin)
    assert client.get(f"/console/messages/{message_id}/raw").status_code == 403
    page = client.get(f"/console/messages/{message_id}").get_data(as_text=True)
    assert "/raw" not in page


def test_bulk_release_by_search_with_preview_and_progress(
    client, operator, two_domains, database, smtp_sink
):
    login_staff(client, operator)
    page = client.get(
        "/console/bulk/confirm?action=release&sender=supplier.no&status=new"
    ).get_data(as_text=True)
    assert "3 messages will be released" in page
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    response = client.post(
        "/console/bulk",
        data={"csrf_token": csrf, "action": "release", "sender": "supplier.no", "status": "new"},
    )
    assert response.status_code == 303
    job_path = response.headers["Location"]
    assert sorted(m.rcpt_tos[0] for m in smtp_sink.wait_for(3)) == [
        "mette@other.dk",
        "ola@example.no",
        "per@example.no",
    ]
    deadline = time.monotonic() + 10
    while True:
        progress = client.get(f"{job_path}/progress").get_json()
        if progress["finished"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert progress["status"] == "done" and progress["done"] == 3 and progress["total"] == 3
    assert "Finished." in client.get(job_path).get_data(as_text=True)
    assert status_of(database, two_domains["newsletter"]) == Status.NEW


def test_bulk_delete_of_a_selection(client, operator, two_domains, database):
    login_staff(client, operator)
    csrf = token(client)
    ids = [str(two_domains["newsletter"]), str(two_domains["virus"])]
    page = client.post(
        "/console/bulk/confirm", data={"csrf_token": csrf, "action": "delete", "ids": ids}
    ).get_data(as_text=True)
    assert "2 messages will be deleted" in page
    response = client.post(
        "/console/bulk", data={"csrf_token": csrf, "action": "delete", "ids": ids}
    )
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    _wait_for_job(database, job_id)
    assert status_of(database, two_domains["virus"]) == Status.DELETED
    assert status_of(database, two_domains["invoice"]) == Status.NEW


def _wait_for_job(database, job_id):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with database.session_scope() as session:
            job = session.get(BulkJob, job_id)
            if job.status in (BulkStatus.DONE, BulkStatus.CANCELLED):
                return job
        time.sleep(0.05)
    raise AssertionError("the bulk job did not finish")


def test_mailbox_page_and_help_for_the_owner(client, operator, two_domains, database, smtp_sink):
    login_staff(client, operator)
    box = two_domains["box:ola@example.no"]
    page = client.get("/console/mailboxes?q=ola@").get_data(as_text=True)
    assert f"/console/mailboxes/{box}" in page
    assert "2 waiting" in client.get(f"/console/mailboxes/{box}").get_data(as_text=True)
    csrf = token(client)
    page = client.post(
        f"/console/mailboxes/{box}/login-link", data={"csrf_token": csrf, "how": "show"}
    ).get_data(as_text=True)
    link = re.search(r'id="login-link">([^<]+)<', page).group(1)
    assert "/l/" in link
    client.post(f"/console/mailboxes/{box}/login-link", data={"csrf_token": csrf, "how": "mail"})
    (mailed,) = smtp_sink.wait_for(1)
    assert mailed.rcpt_tos == ["ola@example.no"]
    body = email.message_from_bytes(mailed.data, policy=email.policy.default).get_body(("plain",))
    assert "/l/" in body.get_content()
    with database.session_scope(write=True) as session:
        session.get(Mailbox, box).password_hash = "x"
    for action in ("password", "revoke", "disable"):
        assert (
            client.post(f"/console/mailboxes/{box}/{action}", data={"csrf_token": csrf}).status_code
            == 303
        )
    with database.session_scope() as session:
        ola = session.get(Mailbox, box)
        assert ola.password_hash is None and ola.disabled and ola.key_version == 3
        actions = set(
            session.scalars(select(AuditEvent.action).where(AuditEvent.mailbox_id == box))
        )
    assert {"login_link.issue", "mailbox.password_reset", "logout.everywhere"} <= actions
    assert "mailbox.disable" in actions
    token_path = link.split("://", 1)[1].split("/", 1)[1]
    other = client.application.test_client()
    assert other.get("/" + token_path).status_code == 400  # revoked, and disabled
    client.post(f"/console/mailboxes/{box}/enable", data={"csrf_token": csrf})
    with database.session_scope() as session:
        assert not session.get(Mailbox, box).disabled


def test_lists_global_domain_and_mailbox(client, operator, admin, two_domains, database):
    login_staff(client, operator)
    csrf = token(client)
    with database.session_scope() as session:
        domain_id = session.scalar(select(Domain.id).where(Domain.name == "example.no"))
    box = two_domains["box:ola@example.no"]
    for kind, owner in (("global", 0), ("domain", domain_id), ("mailbox", box)):
        response = client.post(
            f"/console/lists/{kind}/{owner}/add",
            data={"csrf_token": csrf, "action": "block", "patterns": f"bad-{kind}.example"},
        )
        assert response.status_code == 303
        assert f"bad-{kind}.example" in client.get(f"/console/lists/{kind}/{owner}").get_data(
            as_text=True
        )
    bad = client.post(
        f"/console/lists/domain/{domain_id}/add",
        data={"csrf_token": csrf, "action": "allow", "patterns": "not a@pattern@"},
    )
    assert bad.status_code == 400
    client.post(
        f"/console/lists/mailbox/{box}/remove",
        data={"csrf_token": csrf, "pattern": "bad-mailbox.example"},
    )
    with database.session_scope() as session:
        patterns = {e.scope: e.pattern for e in session.scalars(select(ListEntry))}
    assert patterns == {"global": "bad-global.example", "domain": "bad-domain.example"}
    login_staff(client, admin)
    assert client.get("/console/lists/global/0").status_code == 403
    assert client.get(f"/console/lists/domain/{domain_id}").status_code == 200


def test_reports_page_and_resend(client, operator, two_domains, database, smtp_sink):
    with database.session_scope(write=True) as session:
        report = Report(
            mailbox_id=two_domains["box:ola@example.no"],
            status=ReportStatus.FAILED,
            message_count=2,
            attempts=9,
            last_error="451 4.3.0 try later",
        )
        session.add(report)
        session.flush()
        session.execute(
            Message.__table__.update()
            .where(Message.mailbox_id == report.mailbox_id)
            .values(report_id=report.id)
        )
        report_id = report.id
    login_staff(client, operator)
    page = client.get("/console/reports").get_data(as_text=True)
    assert "451 4.3.0 try later" in page and "ola@example.no" in page
    csrf = token(client)
    client.post(f"/console/reports/{report_id}/resend", data={"csrf_token": csrf})
    (sent,) = smtp_sink.wait_for(1)
    assert sent.rcpt_tos == ["ola@example.no"]
    with database.session_scope() as session:
        assert session.get(Report, report_id).status == ReportStatus.SENT


def test_every_form_needs_the_csrf_token(client, operator, two_domains, database):
    login_staff(client, operator)
    message_id = two_domains["invoice"]
    for path in (
        f"/console/messages/{message_id}/delete",
        "/console/bulk",
        f"/console/mailboxes/{two_domains['box:ola@example.no']}/disable",
    ):
        assert (
            client.post(path, data={"action": "delete", "ids": [str(message_id)]}).status_code
            == 400
        )
    assert status_of(database, message_id) == Status.NEW


def test_console_pages_are_translated(client, operator, database):
    with database.session_scope(write=True) as session:
        session.get(Mailbox, operator.id).language = "nb"
    login_staff(client, operator)
    page = client.get("/console/").get_data(as_text=True)
    assert "Finn meldinger" in page
    with database.session_scope(write=True) as session:
        session.get(Mailbox, operator.id).language = "da"
    page = client.get("/console/").get_data(as_text=True)
    assert "Find mails" in page


# A domain admin, on every console endpoint.


def _ids(database, two_domains):
    """The other domain's (other.dk) rows, and a report and a job there."""
    with database.session_scope(write=True) as session:
        other = session.scalar(select(Domain).where(Domain.name == "other.dk"))
        mette = two_domains["box:mette@other.dk"]
        report = Report(
            mailbox_id=mette, status=ReportStatus.FAILED, message_count=1, last_error="x"
        )
        session.add(report)
        query = search.Query(recipient="mette@other.dk")
        job = bulk.create(session, staff.OPERATOR, ACTOR, "delete", query)
        session.flush()
        return {
            "message_id": two_domains["mette"],
            "mailbox_id": mette,
            "owner_id": mette,
            "domain_id": other.id,
            "report_id": report.id,
            "job_id": job.id,
        }


# Every console route, how a domain admin of example.no tries it on other.dk, and what
# must come back. A new console route fails test_every_console_route_is_covered until
# it is added here.
ROUTES = {
    "console.index": [("GET", "/console/?recipient=other.dk&status=any", 200)],
    "console.message": [("GET", "/console/messages/{message_id}", 404)],
    "console.preview_document": [("GET", "/console/messages/{message_id}/preview", 404)],
    "console.raw": [("GET", "/console/messages/{message_id}/raw", 403)],
    "console.release": [("POST", "/console/messages/{message_id}/release", 404)],
    "console.delete": [("POST", "/console/messages/{message_id}/delete", 404)],
    "console.bulk_confirm": [
        ("GET", "/console/bulk/confirm?action=delete&recipient=other.dk", 200),
        ("POST", "/console/bulk/confirm", 200),
    ],
    "console.bulk_start": [("POST", "/console/bulk", 303)],
    "console.jobs": [("GET", "/console/jobs", 200)],
    "console.job": [("GET", "/console/jobs/{job_id}", 404)],
    "console.job_progress": [("GET", "/console/jobs/{job_id}/progress", 404)],
    "console.job_cancel": [("POST", "/console/jobs/{job_id}/cancel", 404)],
    "console.mailboxes": [("GET", "/console/mailboxes?q=other.dk", 200)],
    "console.mailbox": [("GET", "/console/mailboxes/{mailbox_id}", 404)],
    "console.disable": [("POST", "/console/mailboxes/{mailbox_id}/disable", 404)],
    "console.enable": [("POST", "/console/mailboxes/{mailbox_id}/enable", 404)],
    "console.reset_password": [("POST", "/console/mailboxes/{mailbox_id}/password", 404)],
    "console.revoke": [("POST", "/console/mailboxes/{mailbox_id}/revoke", 404)],
    "console.login_link": [("POST", "/console/mailboxes/{mailbox_id}/login-link", 404)],
    "console.lists_index": [("GET", "/console/lists", 200)],
    "console.owner_lists": [
        ("GET", "/console/lists/domain/{domain_id}", 404),
        ("GET", "/console/lists/mailbox/{owner_id}", 404),
        ("GET", "/console/lists/global/0", 403),
    ],
    "console.list_add": [
        ("POST", "/console/lists/domain/{domain_id}/add", 404),
        ("POST", "/console/lists/mailbox/{owner_id}/add", 404),
        ("POST", "/console/lists/global/0/add", 403),
    ],
    "console.list_remove": [
        ("POST", "/console/lists/domain/{domain_id}/remove", 404),
        ("POST", "/console/lists/mailbox/{owner_id}/remove", 404),
        ("POST", "/console/lists/global/0/remove", 403),
    ],
    "console.reports_index": [("GET", "/console/reports", 200)],
    "console.report_resend": [("POST", "/console/reports/{report_id}/resend", 404)],
    "console.stats": [("GET", "/console/stats", 200)],
    "console.audit": [("GET", "/console/audit?mailbox=mette", 200)],
    "console.audit_csv": [("GET", "/console/audit.csv?mailbox=mette", 200)],
    "console.tokens": [("GET", "/console/tokens", 403)],
    "console.token_create": [("POST", "/console/tokens", 403)],
    "console.token_revoke": [("POST", "/console/tokens/revoke", 403)],
}


def test_every_console_route_is_covered(app):
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert {e for e in endpoints if e.startswith("console.")} == set(ROUTES)


def _snapshot(database):
    """Everything of other.dk that a domain admin of example.no must not change."""
    with database.session_scope() as session:
        mette = session.scalar(select(Mailbox).where(Mailbox.address == "mette@other.dk"))
        return {
            "messages": sorted(
                session.execute(
                    select(Message.id, Message.status, Message.release_attempts).where(
                        Message.mailbox_id == mette.id
                    )
                ).all()
            ),
            "mailbox": (mette.disabled, mette.key_version, mette.password_hash),
            "lists": session.scalar(select(func.count()).select_from(ListEntry)),
            "reports": sorted(session.execute(select(Report.id, Report.status)).all()),
            "jobs": sorted(session.execute(select(BulkJob.id, BulkJob.status)).all()),
        }


def test_a_domain_admin_cannot_see_or_touch_another_domain(
    client, admin, two_domains, database, smtp_sink
):
    ids = _ids(database, two_domains)
    with database.session_scope(write=True) as session:
        session.get(Mailbox, ids["mailbox_id"]).password_hash = "kept"
    login_staff(client, admin)
    csrf = token(client)
    before = _snapshot(database)
    secret_bits = ("mette@other.dk", "Faktura 2233", "Your parcel")
    form = {
        "csrf_token": csrf,
        "action": "delete",
        "ids": [str(ids["message_id"]), str(two_domains["virus"])],
        "recipient": "other.dk",
        "patterns": "evil.example",
        "pattern": "evil.example",
        "how": "show",
    }
    tried = 0
    for endpoint, attempts in ROUTES.items():
        for method, template, expected in attempts:
            path = template.format(**ids)
            if method == "GET":
                response = client.get(path)
            else:
                response = client.post(path, data=form)
            assert response.status_code == expected, (endpoint, path, response.status_code)
            body = response.get_data(as_text=True)
            for bit in secret_bits:
                assert bit not in body, (endpoint, path, bit)
            tried += 1
    assert tried >= len(ROUTES)
    # The bulk job the admin started found nothing of other.dk to delete.
    with database.session_scope() as session:
        theirs = session.scalars(select(BulkJob).where(BulkJob.actor == "anne@example.no")).all()
    assert theirs and all(job.total == 0 for job in theirs)
    for job in theirs:
        _wait_for_job(database, job.id)
    after = _snapshot(database)
    known = {job_id for job_id, _status in before["jobs"]}
    after["jobs"] = [job for job in after["jobs"] if job[0] in known]  # not the admin's own
    assert after == before
    assert smtp_sink.messages == []
    # Their own domain works on the same endpoints.
    page = client.get("/console/?status=any").get_data(as_text=True)
    assert page.count('name="ids"') == 3
    assert client.get(f"/console/messages/{two_domains['invoice']}").status_code == 200


def test_a_domain_admin_cannot_act_on_staff_mailboxes(
    client, admin, operator, two_domains, database
):
    with database.session_scope(write=True) as session:
        boss = staff.add(session, ACTOR, "boss@example.no", "operator", password=PASSWORD)
        boss_id = boss.id
    login_staff(client, admin)
    csrf = token(client)
    assert client.get(f"/console/mailboxes/{boss_id}").status_code == 200
    for action in ("password", "revoke", "disable", "login-link"):
        response = client.post(f"/console/mailboxes/{boss_id}/{action}", data={"csrf_token": csrf})
        assert response.status_code == 403
    with database.session_scope() as session:
        assert session.get(Mailbox, boss_id).password_hash is not None


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def test_hostile_mail_is_escaped_on_every_console_page(
    client, operator, database, store, two_domains
):
    from tests.conftest import hold_message
    from tests.messages import message

    raw = message(
        subject=HOSTILE,
        sender=f'"{HOSTILE}" <evil@evil.example>',
        to="ola@example.no",
        body=HOSTILE,
        headers={"X-Evil": HOSTILE},
    )
    message_id = hold_message(
        database,
        store,
        two_domains["box:ola@example.no"],
        raw,
        sender="evil@evil.example",
        reasons=[{"code": "SUBJECT_CAPS", "text": HOSTILE, "score": 9}],
    )
    login_staff(client, operator)
    pages = [
        "/console/?sender=evil.example",
        f"/console/messages/{message_id}",
        "/console/mailboxes?q=ola@",
        f"/console/mailboxes/{two_domains['box:ola@example.no']}",
    ]
    for path in pages:
        body = client.get(path).get_data(as_text=True)
        assert "<script>alert" not in body and "<img src=x" not in body, path
    body = client.get(f"/console/messages/{message_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body  # shown, as text
    assert "X-Evil" in body
