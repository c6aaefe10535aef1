"""Two-step login codes: drift window, replay refusal, recovery codes used once."""

from __future__ import annotations

import time

import pyotp
import pytest
from sqlalchemy import select

from cleanmail import audit, totp
from cleanmail.models import AuditEvent, Mailbox, RecoveryCode

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
ACTOR = audit.Actor("owner", "ola@example.no")


def code_at(moment: float, secret: str = SECRET) -> str:
    """What the owner's app shows at a moment."""
    return pyotp.TOTP(secret).at(int(moment))


def test_secret_and_provisioning_uri():
    secret = totp.new_secret()
    assert len(secret) >= 32 and secret != totp.new_secret()
    uri = totp.provisioning_uri(secret, "ola@example.no")
    assert uri.startswith("otpauth://totp/Cleanmail:ola%40example.no?")
    assert f"secret={secret}" in uri and "issuer=Cleanmail" in uri
    svg = totp.qr_svg(uri)
    assert svg.startswith("<svg") and "style=" not in svg and "<script" not in svg


def test_code_window_allows_one_step_of_drift():
    now = 1_700_000_015.0
    assert totp.matching_step(SECRET, code_at(now), now) == int(now // 30)
    assert totp.matching_step(SECRET, code_at(now - 30), now) == int(now // 30) - 1
    assert totp.matching_step(SECRET, code_at(now + 30), now) == int(now // 30) + 1
    assert totp.matching_step(SECRET, code_at(now - 60), now) is None
    spaced = code_at(now)[:3] + " " + code_at(now)[3:]
    assert totp.matching_step(SECRET, spaced, now) is not None
    assert totp.matching_step(SECRET, "12345", now) is None
    assert totp.matching_step(SECRET, "abcdef", now) is None


def test_verify_refuses_replay_and_older_steps(database, owner):
    now = time.time()
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        mailbox.totp_secret = SECRET
        assert not totp.verify_code(session, mailbox, code_at(now - 3600), at=now)
        assert totp.verify_code(session, mailbox, code_at(now), at=now)
        assert not totp.verify_code(session, mailbox, code_at(now), at=now)  # replay
        # A code of the previous step is still in the window, but stale once a newer one was used.
        assert not totp.verify_code(session, mailbox, code_at(now - 30), at=now)
        assert totp.verify_code(session, mailbox, code_at(now + 30), at=now + 30)
    with database.session_scope(write=True) as session:  # the marks outlive the transaction
        mailbox = session.get(Mailbox, owner.id)
        assert not totp.verify_code(session, mailbox, code_at(now + 30), at=now + 30)


def test_verify_without_secret(database, owner):
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        assert not totp.verify_code(session, mailbox, code_at(time.time()))


def test_recovery_codes_stored_hashed_and_used_once(database, owner):
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        codes = totp.new_recovery_codes(session, mailbox)
    assert len(codes) == 10 == len(set(codes))
    with database.session_scope() as session:
        stored = set(session.scalars(select(RecoveryCode.code_hash)))
    assert len(stored) == 10 and not stored & set(codes)
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        assert totp.use_recovery_code(session, mailbox, codes[0].upper().replace("-", " "))
        assert not totp.use_recovery_code(session, mailbox, codes[0])
        assert not totp.use_recovery_code(session, mailbox, "")
        assert not totp.use_recovery_code(session, mailbox, "nothing-valid")
        assert totp.recovery_codes_left(session, mailbox) == 9
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        fresh = totp.new_recovery_codes(session, mailbox)
        assert not totp.use_recovery_code(session, mailbox, codes[1])  # replaced
        assert totp.use_recovery_code(session, mailbox, fresh[1])


def test_enable_needs_a_right_code_and_disable_forgets(database, owner):
    secret = totp.new_secret()
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        with pytest.raises(totp.TotpError):
            totp.enable(session, ACTOR, mailbox, secret, "not a code")
        assert mailbox.totp_secret is None
        codes = totp.enable(session, ACTOR, mailbox, secret, pyotp.TOTP(secret).now())
        assert len(codes) == 10 and mailbox.totp_secret == secret
    with database.session_scope(write=True) as session:
        mailbox = session.get(Mailbox, owner.id)
        totp.disable(session, ACTOR, mailbox)
        assert mailbox.totp_secret is None and totp.recovery_codes_left(session, mailbox) == 0
        actions = list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions[-2:] == ["totp.enable", "totp.disable"]
