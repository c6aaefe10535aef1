"""Verdicts on today's mail: the hand-written messages in tests/mail/modern through the filter.

Three setups, all through ``pipeline.analyze`` (what the filter runs on every message):

- ``new``: a new installation, the rules engine alone (no classifier model yet);
- ``trained``: the rules plus a classifier trained on the whole shared corpus, as
  ``cleanmail engine train`` trains (one pass);
- ``full``: as ``trained``, plus the pipeline's attachment blocking; a new installation's
  allow/block lists are empty, so they change nothing here.

Prints one row per message: its score and whether it is held in each setup (default
threshold), and the rules that fired.

    .venv/bin/python bench/modern_mail.py [--no-train]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import corpus  # noqa: E402

from cleanmail import mime  # noqa: E402
from cleanmail.config import Config  # noqa: E402
from cleanmail.filter import engines, learned, pipeline, rules  # noqa: E402

MODERN = Path(__file__).resolve().parent.parent / "tests" / "mail" / "modern"
THRESHOLD = Config.quarantine_threshold


class _Fixed:
    """A model watcher that always has the same model (no database here)."""

    def __init__(self, model: object) -> None:
        self.model = model

    def current(self) -> object:
        return self.model


def main() -> int:
    """Score every modern message in each setup and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-train", action="store_true", help="the new-install setup only")
    args = parser.parse_args()
    setups: dict[str, list[engines.Engine]] = {"new": [rules.RulesEngine()]}
    if not args.no_train:
        model = corpus.train(corpus.load("all"))
        setups["trained"] = [rules.RulesEngine(), learned.LearnedEngine(_Fixed(model))]
    envelope = engines.Envelope("sender@example.net", ("rcpt@kunde-isp.no",))
    held = {name: {"ham": 0, "spam": 0} for name in [*setups, "full"]}
    total = {"ham": 0, "spam": 0}
    print(f"{'message':40}" + "".join(f"{n:>12}" for n in held) + "  rules fired (new)")
    for label in ("ham", "spam"):
        for path in sorted((MODERN / label).glob("*.eml")):
            total[label] += 1
            raw = path.read_bytes()
            cells, fired = [], ""
            for name, scorers in setups.items():
                analysis = pipeline.analyze(mime.parse(raw), envelope, scorers)
                score = analysis.result.score
                cells.append(f"{score:7.1f} {'HELD' if score >= THRESHOLD else '  - '}")
                held[name][label] += score >= THRESHOLD
                if name == "new":
                    fired = " ".join(f"{h.code}({h.score:g})" for h in analysis.result.hits)
                if name == list(setups)[-1]:
                    blocked = bool(analysis.findings)
                    full = score >= THRESHOLD or blocked
                    held["full"][label] += full
                    mark = ("HELD" if full else "  - ") + ("A" if blocked else "")
                    cells.append(f"{score:7.1f} {mark}")
            print(f"{path.stem[:40]:40}" + "".join(f"{c:>12}" for c in cells) + f"  {fired}")
    print(f"\nthreshold {THRESHOLD:g}; A = blocked attachment")
    for name, counts in held.items():
        share = counts["spam"] / max(total["spam"], 1)
        print(
            f"{name:8} ham held {counts['ham']}/{total['ham']}, "
            f"spam held {counts['spam']}/{total['spam']} ({share:.0%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
