"""The filter's checks in process, per message and stage, beside the email package.

What ``bench/ingest.py`` cannot show through the SMTP server and the store: the CPU
that parsing, the rules, the learning classifier and the attachment scan spend on one
message, one message at a time on one core, for the 5,000-message bench mix
(``ingest.load_messages``: the corpus, every tenth with GTUBE added). The reference,
measured in the same run, is ``email.message_from_bytes(raw, policy=compat32)``.

    .venv/bin/python bench/checks.py                  # ms per message per stage
    .venv/bin/python bench/checks.py --profile rules  # and a cProfile of one stage
    .venv/bin/python bench/checks.py --dump out.jsonl # every verdict, to compare code

``--dump`` writes, for every message of the corpus (as stored, with CRLF line ends, and
with GTUBE added too), of tests/mail and of a fixed set of mangled corpus messages, the
rules' hits and score, the classifier's tokens and result (a model trained on the
corpus) and the attachment findings, one JSON line each. Two dumps from two versions of
the code must be identical (``cmp``) when a change is meant to make the checks faster,
not different. This file imports the code of the checkout it lies in: to dump another
version, copy it into an export of that version and run it there, e.g.
``git archive COMMIT | tar -x -C /tmp/old && cp bench/checks.py /tmp/old/bench/`` and
``cd /tmp/old && CLEANMAIL_CORPUS=... .venv-path/bin/python bench/checks.py --dump old.jsonl``.
"""

from __future__ import annotations

import argparse
import cProfile
import email
import hashlib
import json
import os
import pstats
import random
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.policy import compat32
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH)]

import corpus  # noqa: E402  (bench/corpus.py; it puts the checkout on sys.path)
import ingest  # noqa: E402

from cleanmail import mime  # noqa: E402
from cleanmail.filter import (  # noqa: E402
    attachments,
    classifier,
    engines,
    learned,
    rules,
    tokenizer,
    view,
)

ENVELOPE = engines.Envelope("sender@example.org", ("user0@example.no",))
CLOCK = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)  # fixed: DATE_IN_FUTURE depends on "now"
STAGES = ("reference", "parse", "rules", "classifier", "attachments")


class Fixed:
    """A model watcher that always has the same model (no database in a benchmark)."""

    def __init__(self, model: classifier.Model) -> None:
        self.model = model

    def current(self) -> classifier.Model:
        """The one model."""
        return self.model


def bench_raws(count: int) -> list[bytes]:
    """The bench mix as the filter receives it: DATA without dot-stuffing or terminator."""
    return [unstuff(message.data) for message in ingest.load_messages(count)]


def unstuff(data: bytes) -> bytes:
    """SMTP DATA back to the message: the terminator off, doubled leading dots single."""
    return (b"\r\n" + data[:-3]).replace(b"\r\n..", b"\r\n.")[2:]


def train_model() -> classifier.Model:
    """A model trained on the whole corpus with this code's tokens."""
    return corpus.train(corpus.load("all"))


def timings(raws: list[bytes], model: classifier.Model) -> dict[str, float]:
    """CPU seconds per stage over all messages, one message through every stage at a time."""
    rules_engine = rules.RulesEngine(clock=lambda: CLOCK)
    learned_engine = learned.LearnedEngine(Fixed(model))
    spent = dict.fromkeys(STAGES, 0.0)
    # Caches across messages start empty in every round, as in a freshly started filter.
    for cached in (getattr(view, "registrable", None),):
        if cached is not None:
            cached.cache_clear()
    clock = time.process_time
    for raw in raws:
        start = clock()
        email.message_from_bytes(raw, policy=compat32)
        mark = clock()
        spent["reference"] += mark - start
        parsed = mime.parse(raw)
        start = clock()
        spent["parse"] += start - mark
        rules_engine.check(parsed, ENVELOPE)
        mark = clock()
        spent["rules"] += mark - start
        learned_engine.check(parsed, ENVELOPE)
        start = clock()
        spent["classifier"] += start - mark
        attachments.scan(parsed.parts)
        spent["attachments"] += clock() - start
    return spent


def profile(raws: list[bytes], model: classifier.Model, stage: str, out: str | None) -> None:
    """cProfile of one stage alone (the others run unprofiled before it, as in the filter)."""
    rules_engine = rules.RulesEngine(clock=lambda: CLOCK)
    learned_engine = learned.LearnedEngine(Fixed(model))
    profiler = cProfile.Profile()
    for raw in raws:
        if stage == "parse":
            profiler.runcall(mime.parse, raw)
            continue
        parsed = mime.parse(raw)
        if stage == "rules":
            profiler.runcall(rules_engine.check, parsed, ENVELOPE)
            continue
        rules_engine.check(parsed, ENVELOPE)
        if stage == "classifier":
            profiler.runcall(learned_engine.check, parsed, ENVELOPE)
        else:
            profiler.runcall(attachments.scan, parsed.parts)
    if out:
        profiler.dump_stats(out)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


# --- the equivalence dump ----------------------------------------------------------


def dump_messages() -> Iterator[tuple[str, bytes]]:
    """(name, raw) for every message the dump covers, in a fixed order."""
    files = sorted(p for folder in ("ham", "spam") for p in (corpus.CORPUS / folder).iterdir())
    for path in files:
        raw = path.read_bytes()
        yield f"corpus/{path.parent.name}/{path.name}", raw
        yield f"crlf/{path.parent.name}/{path.name}", ingest.to_crlf(raw)
        yield f"bench/{path.parent.name}/{path.name}", ingest.to_crlf(raw) + ingest.GTUBE + b"\r\n"
    for path in sorted((corpus.ROOT / "tests" / "mail").rglob("*")):
        if path.is_file():
            yield f"tests/{path.relative_to(corpus.ROOT / 'tests' / 'mail')}", path.read_bytes()
    rng = random.Random(2)
    for number in range(3000):
        path = files[rng.randrange(len(files))]
        yield f"mangled/{number}/{path.name}", mangle(path.read_bytes(), rng)


_SPLICES = (
    b"<", b">", b"&", b"&amp;", b"&#x41;", b"<!--", b"-->", b"<script>", b"</script>", b"<style",
    b"<a href=http://1.2.3.4/x>www.paypal.com</a>", b"<A HREF='", b"\x00", b"\xff\xfe", b"\xc3",
    b"\r", b"\n", b"\r\n\r\n", b"=?utf-8?b?", b"?=", b"=?iso-8859-1?q?caf=E9?=", b"--", b"\t",
    b"Content-Type: multipart/mixed; boundary=x\r\n", b"--x\r\n", b"--x--", b"BITCOIN ",
    b"CLICK HERE!!! $$$ ", b"\xe4\xb8\xad\xe6\x96\x87", b"\xd9\x85\xd8\xb1", b"http://bit.ly/x ",
    b"Date: Mon, 1 Jan 2001 00:00:00 +9999\r\n", b"I", b"\xc4\xb0", b"\xe1\xba\x9e",
    b"\xef\xac\x80",
)  # fmt: skip


def mangle(raw: bytes, rng: random.Random) -> bytes:
    """A corpus message with some bytes spliced in, cut or upper-cased: odd input, fixed seed."""
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 12)):
        at = rng.randrange(len(data) + 1)
        what = rng.randrange(5)
        if what == 0:
            data[at:at] = rng.choice(_SPLICES)
        elif what == 1:
            del data[at : at + rng.randrange(1, 200)]
        elif what == 2:
            data[at : at + 500] = bytes(data[at : at + 500]).upper()
        elif what == 3:
            data[at:at] = rng.choice(_SPLICES) * rng.randrange(2, 300)
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    return bytes(data)


def dump(path: str) -> None:
    """One JSON line per message: what every check found."""
    model = train_model()
    rules_engine = rules.RulesEngine(clock=lambda: CLOCK)
    with open(path, "w", encoding="utf-8") as out:
        for name, raw in dump_messages():
            parsed = mime.parse(raw)
            result = rules_engine.check(parsed, ENVELOPE)
            tokens = tokenizer.tokenize(parsed)
            own = learned.score(model, tokens)
            findings = attachments.scan(parsed.parts)
            line = {
                "file": name,
                "rules": [[hit.code, hit.score, hit.text] for hit in result.hits],
                "score": result.score,
                "tokens": hashlib.sha256("\n".join(tokens).encode("utf-8", "replace")).hexdigest(),
                "classifier": [[hit.code, hit.score, hit.text] for hit in own.hits],
                "classifier_score": own.score,
                "attachments": [[finding.filename, finding.reason] for finding in findings],
                "defects": parsed.defects,
            }
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def main() -> int:
    """Time the stages (or dump every verdict) and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--profile", choices=STAGES[1:], help="cProfile this stage")
    parser.add_argument("--profile-out", help="also save the profile's stats to this file")
    parser.add_argument("--dump", metavar="FILE", help="write every verdict as JSON lines")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core
    if args.dump:
        dump(args.dump)
        return 0
    model = train_model()
    raws = bench_raws(args.messages)
    if args.profile:
        profile(raws, model, args.profile, args.profile_out)
        return 0
    best = _best(lambda: timings(raws, model), args.rounds)
    print(f"{len(raws)} messages of the bench mix, one at a time, one core; best of {args.rounds}")
    print(f"{'stage':<28}{'ms/msg':>8}{'x ref':>8}")
    reference = best["reference"]
    labels = {
        "reference": "email compat32 (reference)",
        "parse": "mime.parse",
        "rules": "RulesEngine.check",
        "classifier": "LearnedEngine.check",
        "attachments": "attachments.scan",
    }
    for stage in STAGES:
        ms = best[stage] * 1000 / len(raws)
        print(f"{labels[stage]:<28}{ms:>8.3f}{best[stage] / reference:>8.2f}")
    checks = best["parse"] + best["rules"] + best["classifier"]
    print(
        f"{'parse + rules + classifier':<28}{checks * 1000 / len(raws):>8.3f}"
        f"{checks / reference:>8.2f}"
    )
    return 0


def _best(run: Callable[[], dict[str, float]], rounds: int) -> dict[str, float]:
    """Each stage's least CPU time over several rounds (the machine is shared and noisy)."""
    results = [run() for _ in range(rounds)]
    return {stage: min(r[stage] for r in results) for stage in STAGES}


if __name__ == "__main__":
    sys.exit(main())
