"""The learning classifier: training from folders, learning from owners, shared by filters."""

from __future__ import annotations

import dataclasses
import json
import random
import smtplib
import time

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from sqlalchemy import func, select

from cleanmail import audit, learning, mailboxes, mime, quarantine
from cleanmail.cli import cli, engine
from cleanmail.config import Endpoint
from cleanmail.filter import classifier, engines, learned, tokenizer
from cleanmail.models import ClassifierModel, Mailbox, Message, Status
from cleanmail.relay import Relay
from tests import test_filter_hostile as hostile
from tests.conftest import FilterProcess, login_as
from tests.messages import message
from tests.servers import free_port
from tests.test_mime import broken_mime

OPERATOR = audit.Actor("operator", "test")
HAM_WORDS = (
    "meeting lunch project report tomorrow thanks family dinner weekend schedule agenda "
    "minutes notes draft review holiday photos birthday football practice kindergarten"
).split()
SPAM_WORDS = (
    "cheap replica watches discount offer limited deal casino bonus winner prize pills "
    "pharmacy credit loan guaranteed income exclusive bargain clearance"
).split()
NEWSLETTER = "Nyhetsbrev <nyheter@skobutikken.example>"


def text(rng: random.Random, words: list[str], count: int = 40) -> str:
    return " ".join(rng.choice(words) for _ in range(count)) + "\n"


def ham(rng: random.Random, n: int) -> bytes:
    return message(
        subject=f"{rng.choice(HAM_WORDS)} {rng.choice(HAM_WORDS)}",
        sender=f"friend{n}@example.org",
        body=text(rng, HAM_WORDS),
    )


def spam(rng: random.Random, n: int) -> bytes:
    return message(
        subject=f"{rng.choice(SPAM_WORDS)} {rng.choice(SPAM_WORDS)}",
        sender=f"promo{n}@bulk{n % 5}.example",
        body=text(rng, SPAM_WORDS),
    )


def newsletter(n: int) -> bytes:
    """Mail an owner wants though it reads like an offer: a shop's autumn newsletter."""
    return message(
        subject=f"Exclusive discount offer {n}: clearance bargain",
        sender=NEWSLETTER,
        body=f"Limited deal: discount offer, exclusive bargain number {n}. Guaranteed clearance.\n",
    )


def pure_spam() -> bytes:
    """Spam that shares no wording with the newsletter."""
    words = "cheap replica watches casino bonus winner prize pills pharmacy credit loan income"
    return message(
        subject="cheap replica watches", sender="promo@bulk.example", body=f"{words}\n" * 3
    )


@pytest.fixture
def folders(tmp_path):
    """60 ham files with mbox From_ lines, and spam as 50 files plus one mbox of 10."""
    rng = random.Random(6)
    ham_dir, spam_dir = tmp_path / "ham", tmp_path / "spam"
    ham_dir.mkdir()
    spam_dir.mkdir()
    for n in range(60):
        (ham_dir / f"{n:03}.eml").write_bytes(
            b"From friend@example.org Sun Nov 22 10:00:00 2026\n" + ham(rng, n)
        )
    for n in range(50):
        (spam_dir / f"{n:03}.eml").write_bytes(spam(rng, n))
    mbox = b""
    for n in range(50, 60):
        body = spam(rng, n).replace(b"\r\n", b"\n") + b"\n>From the desk of the winner\n"
        mbox += f"From promo{n}@bulk.example Sun Nov 22 10:00:00 2026\n".encode() + body + b"\n"
    (spam_dir / "more.mbox").write_bytes(mbox)
    return ham_dir, spam_dir


@pytest.fixture
def run(config):
    """Run a cleanmail command against the test's configuration."""
    env = FilterProcess(config).environment()

    def invoke(*args: str, ok: bool = True):
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke


def test_mbox_files_are_split_and_unquoted(folders):
    messages = engine.split_mbox((folders[1] / "more.mbox").read_bytes())
    assert len(messages) == 10
    assert all(m.startswith(b"From: ") or b"\nFrom: " in m for m in messages)
    assert all(b"\nFrom the desk of the winner\n" in m for m in messages)
    assert engine.split_mbox(b"Subject: plain\n\nbody\n") == [b"Subject: plain\n\nbody\n"]
    assert len(list(engine.read_folder(folders[0]))) == 60


def test_untrained_install_scores_nothing(database):
    engine_ = learned.LearnedEngine(learned.ModelWatcher(database))
    result = engine_.check(mime.parse(message()), engines.Envelope("", ()))
    assert result == engines.EngineResult(0.0, ())
    assert engine_.watcher.version is None


def test_train_and_evaluate_on_the_installation(run, folders, database):
    ham_dir, spam_dir = map(str, folders)
    before = json.loads(
        run("engine", "evaluate", "--ham", ham_dir, "--spam", spam_dir, "--json").output
    )
    assert before["model_version"] is None
    trained = run("engine", "train", "--ham", ham_dir, "--spam", spam_dir).output
    assert "model version 1: 60 ham and 60 spam learned" in trained
    figures = json.loads(
        run("engine", "evaluate", "--ham", ham_dir, "--spam", spam_dir, "--json").output
    )
    assert figures["model_version"] == 1
    assert figures["spam_recall"] == 1.0 and figures["ham_fp_rate"] == 0.0
    assert figures["confusion"] == {
        "ham": {"pass": 60, "quarantine": 0},
        "spam": {"pass": 0, "quarantine": 60},
    }
    assert figures["spam_recall"] > before["spam_recall"]
    table = run("engine", "evaluate", "--ham", ham_dir, "--spam", spam_dir).output
    assert "spam recall:         100.00%" in table
    assert "ham false positives: 0.00%" in table
    assert "ham                 60           0" in table
    run("engine", "train", "--ham", ham_dir, "--spam", spam_dir)  # on top of version 1
    with database.session_scope() as session:
        rows = session.execute(select(ClassifierModel.id, ClassifierModel.ham_count)).all()
    assert sorted(rows) == [(1, 60), (2, 120)]
    empty = folders[0].parent / "empty"
    empty.mkdir()
    refused = run("engine", "train", "--ham", str(empty), "--spam", spam_dir, ok=False)
    assert refused.exit_code == 1 and "no messages in" in refused.output


def test_hits_name_the_spam_wording(run, folders, database):
    run("engine", "train", "--ham", str(folders[0]), "--spam", str(folders[1]))
    watcher = learned.ModelWatcher(database)
    raw = message(subject="cheap replica watches", body="discount casino bonus winner\n")
    result = learned.LearnedEngine(watcher).check(mime.parse(raw), engines.Envelope("", ()))
    assert result.score > 3  # well toward spam, from the body and subject words
    codes = [hit.code for hit in result.hits]
    assert "CLASSIFIER_WORDING" in codes
    wording = next(hit for hit in result.hits if hit.code == "CLASSIFIER_WORDING")
    assert wording.text.startswith("known spam wording: ")
    assert set(wording.text.partition(": ")[2].split(", ")) <= set(SPAM_WORDS)
    friendly = learned.LearnedEngine(watcher).check(
        mime.parse(ham(random.Random(1), 1)), engines.Envelope("", ())
    )
    assert friendly.score < 0 and [hit.code for hit in friendly.hits] == ["CLASSIFIER_HAM"]


def test_model_state_round_trips_and_refuses_other_bytes():
    model = classifier.Model.empty()
    model.learn(classifier.indices(["subj:cheap", "pills"]), True)
    model.learn(classifier.indices(["subj:lunch", "friday"]), False)
    copy = classifier.Model.from_bytes(model.to_bytes())
    assert (copy.ham, copy.spam, copy.bias) == (1, 1, model.bias)
    assert (copy.weights == model.weights).all() and (copy.squares == model.squares).all()
    for bad in (b"", b"not a model", b"\x80\x04\x95" + bytes(40)):
        with pytest.raises(classifier.ModelError):
            classifier.Model.from_bytes(bad)


def send(port: int, raw: bytes, sender: str = "nyheter@skobutikken.example") -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("mx.cleanmail.test")
        client.mail(sender)
        client.rcpt("ola@example.no")
        return client.data(raw)[0]


def held_ids(database) -> list[int]:
    with database.session_scope() as session:
        return list(
            session.scalars(
                select(Message.id).where(Message.status == Status.NEW).order_by(Message.id)
            )
        )


def test_releases_teach_every_filter_process(
    run, folders, config, database, store, smtp_sink, monkeypatch
):
    """A few releases move the sender's next message to pass, in two filters and after a restart."""
    with database.session_scope(write=True) as session:
        mailboxes.add_domain(session, OPERATOR, "example.no")
        mailboxes.add_mailbox(session, OPERATOR, "ola@example.no")
    run("engine", "train", "--ham", str(folders[0]), "--spam", str(folders[1]))
    monkeypatch.setenv("CLEANMAIL_CLASSIFIER_RELOAD", "0.2")
    other = dataclasses.replace(config, filter_listen=Endpoint("127.0.0.1", free_port()))
    first, second = FilterProcess(config).start(), FilterProcess(other).start()
    try:
        for n, process in enumerate((first, second, first)):
            assert send(process.config.filter_listen.port, newsletter(n)) == 250
        assert len(held_ids(database)) == 3 and smtp_sink.messages == []
        relay = Relay(config.relay, timeout=10, hostname="test")
        for message_id in held_ids(database):
            with database.session_scope(write=True) as session:
                quarantine.release(
                    session, store, relay, quarantine.get(session, message_id), OPERATOR
                )
        assert len(smtp_sink.wait_for(3)) == 3
        assert learning.apply_pending(database, store) == 2
        time.sleep(1)  # both filters look for a new version every 0.2 s
        assert send(second.config.filter_listen.port, newsletter(10)) == 250
        assert len(smtp_sink.wait_for(4)) == 4 and held_ids(database) == []
        assert first.stop() == 0
        first = FilterProcess(config).start()  # a restart loads the newest version at once
        assert send(config.filter_listen.port, newsletter(11)) == 250
        assert len(smtp_sink.wait_for(5)) == 5
        # Still spam to everyone else: the lessons were about this sender's wording. (The
        # synthetic mail shares every header with the newsletter, so the margin shrinks.)
        with database.session_scope() as session:
            _version, model = learning.latest_model(session)
        spam_points = learned.score(model, tokenizer.tokenize(mime.parse(pure_spam()))).score
        ham_points = learned.score(model, tokenizer.tokenize(mime.parse(newsletter(12)))).score
        assert spam_points >= 2.0 and ham_points < 0
    finally:
        first.stop()
        second.stop()


HOSTILE = [
    b"",
    b"\x00" * 10_000,
    b"Subject: " + b"A" * 2_000_000 + b"\r\n\r\nbody",
    b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 50) for n in range(60_000)) + b"\r\nbody",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 5000,
    b"Content-Type: text/html; charset=x-no-such-charset\r\n\r\n"
    + b"<a href=http://"
    + b"a." * 100_000
    + b">x</a>"
    + b"<" * 200_000,
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + b"!!!!====" * 100_000,
    b"Content-Type: text/plain; charset=utf-16\r\nSubject: =?utf-8?b?////?= =?x?q?=ZZ?=\r\n\r\n"
    + bytes(range(256)) * 1000,
    b"From: \x00<\x00@\x00>\r\nMessage-ID: <@@@>\r\n\r\n"
    + ("\u00e6\u00f8\u00e5 ".encode() * 100_000),
    b"Content-Type: text/html\r\n\r\n<font size=7>" + b"<!--" * 100_000 + b"word " * 100_000,
]


@pytest.mark.parametrize("raw", HOSTILE, ids=range(len(HOSTILE)))
def test_tokenizer_survives_hostile_mail_quickly(raw):
    start = time.process_time()
    tokens = tokenizer.tokenize(mime.parse(raw))
    assert time.process_time() - start < 5
    assert len(tokens) <= tokenizer.MAX_TOKENS and len(set(tokens)) == len(tokens)
    assert all(isinstance(t, str) and 0 < len(t) <= 120 for t in tokens)
    model = classifier.Model.empty()
    model.learn(classifier.indices(tokens), True)
    assert abs(model.logit(classifier.indices(tokens))) < 100


def test_owner_reads_why_in_their_language(run, folders, owner, client, filter_server, database):
    run("engine", "train", "--ham", str(folders[0]), "--spam", str(folders[1]))
    assert send(filter_server.port, pure_spam(), sender="promo@bulk.example") == 250
    (message_id,) = held_ids(database)
    with database.session_scope() as session:
        reasons = session.get(Message, message_id).reasons
    assert reasons[0]["code"] == "CLASSIFIER_WORDING" and reasons[0]["score"] >= 5
    login_as(client, owner)
    page = client.get(f"/messages/{message_id}").get_data(as_text=True)
    assert "Wording known from spam (" in page
    with database.session_scope(write=True) as session:
        session.get(Mailbox, owner.id).language = "nb"
    page = client.get(f"/messages/{message_id}").get_data(as_text=True)
    assert "Formuleringer kjent fra spam (" in page


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=broken_mime())
def test_tokenizer_and_score_never_raise_on_broken_mime(raw):
    model = classifier.Model.empty()
    model.learn(classifier.indices(["subj:offer", "cheap"]), True)
    model.learn(classifier.indices(["subj:lunch", "friday"]), False)
    tokens = tokenizer.tokenize(mime.parse(raw))
    assert len(tokens) <= tokenizer.MAX_TOKENS
    result = learned.score(model, tokens)
    assert learned.MIN_POINTS <= result.score <= learned.MAX_POINTS


def test_trained_filter_takes_hostile_mail(run, folders, owner, filter_server, smtp_sink, database):
    run("engine", "train", "--ham", str(folders[0]), "--spam", str(folders[1]))
    for raw in hostile.HOSTILE.values():
        assert send(filter_server.port, raw, sender="a@example.com") == 250
    assert filter_server.pipeline.engines[-1].watcher.version == 1  # scored with the model
    with database.session_scope() as session:
        kept = session.scalar(select(func.count()).select_from(Message))
    assert kept + len(smtp_sink.messages) == len(hostile.HOSTILE)
