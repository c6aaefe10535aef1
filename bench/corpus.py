"""The shared corpus, split once into a DEV set (for tuning) and an EVALUATION set.

Which set a message is in depends only on a hash of its file name with a salt of its
own, never on its content or on any result: ``DEV_PERCENT`` of the hash's buckets are
DEV. ``bench/tune.py`` chooses the model's constants by cross-validation on DEV
alone; ``bench/accuracy.py`` scores only EVALUATION messages (DEV may join a model's
training, never its scoring). So no evaluated message informed a constant.

Folds inside either set come from a second hash with another salt.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cleanmail import mime  # noqa: E402
from cleanmail.filter import classifier, engines, rules, tokenizer  # noqa: E402

CORPUS = Path(os.environ.get("CLEANMAIL_CORPUS", "") or ROOT.parent / "shared" / "corpus")
DEV_PERCENT = 20


def bucket(salt: str, name: str, buckets: int) -> int:
    """One of ``buckets`` buckets for a file name, from a hash salted with ``salt``."""
    return int(hashlib.sha256(f"{salt}:{name}".encode()).hexdigest(), 16) % buckets


def is_dev(name: str) -> bool:
    """True when a message (by its file name) belongs to the DEV set, used for tuning."""
    return bucket("dev", name, 100) < DEV_PERCENT


def fold_of(name: str, folds: int) -> int:
    """A message's fold: from a hash of its file name, never from its content or results."""
    return bucket("fold", name, folds)


@dataclass
class Sample:
    """One corpus message, parsed once: its tokens and the rules it triggers."""

    name: str
    spam: bool
    raw: bytes
    tokens: list[str]
    hits: frozenset[str]  # codes of the rules the message triggers
    rules: float  # their scores' sum, with the scores in rules.py
    dev: bool

    def fold(self, folds: int) -> int:
        """This message's fold among ``folds``."""
        return fold_of(self.name, folds)


def load(part: str = "all") -> list[Sample]:
    """The corpus messages of one part ("dev", "eval" or "all"), parsed and tokenized."""
    if not (CORPUS / "ham").is_dir() or not (CORPUS / "spam").is_dir():
        sys.exit(f"no corpus at {CORPUS} (set CLEANMAIL_CORPUS)")
    engine = rules.RulesEngine()
    envelope = engines.Envelope("", ())
    samples = []
    for label in ("ham", "spam"):
        for path in sorted((CORPUS / label).iterdir()):
            dev = is_dev(path.name)
            if (part == "dev" and not dev) or (part == "eval" and dev):
                continue
            raw = path.read_bytes()
            parsed = mime.parse(raw)
            result = engine.check(parsed, envelope)
            samples.append(
                Sample(
                    path.name,
                    label == "spam",
                    raw,
                    tokenizer.tokenize(parsed),
                    frozenset(hit.code for hit in result.hits),
                    result.score,
                    dev,
                )
            )
    return samples


def train(samples: Iterable[Sample]) -> classifier.Model:
    """A model trained from nothing on some samples, in one pass, as ``engine train`` does."""
    model = classifier.Model.empty()
    model.train([(classifier.indices(s.tokens), s.spam) for s in samples], epochs=1)
    return model


def rates(counts: dict[str, int]) -> tuple[float, float]:
    """Spam recall and ham false-positive rate from confusion counts."""
    spam = counts["spam_held"] + counts["spam_pass"]
    ham = counts["ham_held"] + counts["ham_pass"]
    return counts["spam_held"] / max(spam, 1), counts["ham_held"] / max(ham, 1)


def confusion(samples: Sequence[Sample], scores: Sequence[float], threshold: float) -> dict:
    """Confusion counts of held (score at or above the threshold) against the labels."""
    counts = {"ham_pass": 0, "ham_held": 0, "spam_pass": 0, "spam_held": 0}
    for sample, score in zip(samples, scores, strict=True):
        label = "spam" if sample.spam else "ham"
        counts[f"{label}_{'held' if score >= threshold else 'pass'}"] += 1
    return counts
