"""Accuracy and speed of the learning classifier, k-fold over the shared corpus.

Each message's fold is a hash of its file name; every fold is scored by a model
trained only on the other folds, from nothing, exactly as ``cleanmail engine train``
trains (one pass). Nothing is tuned here: the model's constants are fixed in
cleanmail/filter/classifier.py and learned.py. The verdict is the filter's: rules plus
classifier against the default quarantine threshold. Then classification throughput
on one core, beside parsing alone in the same run (the machine is shared and noisy).

    .venv/bin/python bench/accuracy.py [--folds 5] [--speed-messages 2000] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cleanmail import mime  # noqa: E402
from cleanmail.config import Config  # noqa: E402
from cleanmail.filter import classifier, engines, learned, rules, tokenizer  # noqa: E402

CORPUS = Path(os.environ.get("CLEANMAIL_CORPUS", "") or ROOT.parent / "shared" / "corpus")
THRESHOLD = Config.quarantine_threshold  # the default a domain gets
TARGET_RECALL = 0.95
TARGET_FP = 0.005
TARGET_RATE = 2000.0


@dataclass
class Sample:
    """One corpus message with what the folds need."""

    name: str
    spam: bool
    raw: bytes
    tokens: list[str]
    rules: float
    fold: int


def fold_of(name: str, folds: int) -> int:
    """A message's fold: from a hash of its file name, never from its content or results."""
    return int(hashlib.sha256(f"fold:{name}".encode()).hexdigest(), 16) % folds


def load(folds: int) -> list[Sample]:
    """Every corpus message, parsed once, with its tokens and rules score."""
    if not (CORPUS / "ham").is_dir() or not (CORPUS / "spam").is_dir():
        sys.exit(f"no corpus at {CORPUS} (set CLEANMAIL_CORPUS)")
    engine = rules.RulesEngine()
    envelope = engines.Envelope("", ())
    samples = []
    for label in ("ham", "spam"):
        for path in sorted((CORPUS / label).iterdir()):
            raw = path.read_bytes()
            parsed = mime.parse(raw)
            score = engine.check(parsed, envelope).score
            tokens = tokenizer.tokenize(parsed)
            samples.append(
                Sample(path.name, label == "spam", raw, tokens, score, fold_of(path.name, folds))
            )
    return samples


def cross_validate(samples: list[Sample], folds: int) -> dict[str, dict[str, int]]:
    """Confusion counts for the filter's verdict and for the classifier alone."""
    counts = {
        kind: {"ham_pass": 0, "ham_held": 0, "spam_pass": 0, "spam_held": 0}
        for kind in ("filter", "classifier", "rules")
    }
    for fold in range(folds):
        model = classifier.Model.empty()
        model.train(
            [(classifier.indices(s.tokens), s.spam) for s in samples if s.fold != fold], epochs=1
        )
        for sample in (s for s in samples if s.fold == fold):
            own = learned.score(model, sample.tokens).score
            label = "spam" if sample.spam else "ham"
            for kind, total in (
                ("filter", sample.rules + own),
                ("classifier", own),
                ("rules", sample.rules),
            ):
                counts[kind][f"{label}_{'held' if total >= THRESHOLD else 'pass'}"] += 1
    return counts


def rates(counts: dict[str, int]) -> tuple[float, float]:
    """Spam recall and ham false-positive rate."""
    spam = counts["spam_held"] + counts["spam_pass"]
    ham = counts["ham_held"] + counts["ham_pass"]
    return counts["spam_held"] / spam, counts["ham_held"] / ham


def speed(samples: list[Sample], count: int) -> dict[str, float]:
    """Messages a second on this one core: parsing alone, and classifying parsed mail."""
    model = classifier.Model.empty()
    model.train([(classifier.indices(s.tokens), s.spam) for s in samples], epochs=1)
    raws = [samples[i % len(samples)].raw for i in range(count)]
    start = time.process_time()
    parsed = [mime.parse(raw) for raw in raws]
    parse = time.process_time() - start
    engine = learned.LearnedEngine(_Fixed(model))
    envelope = engines.Envelope("", ())
    start = time.process_time()
    for message in parsed:
        engine.check(message, envelope)
    classify = time.process_time() - start
    fresh = [mime.parse(raw) for raw in raws]  # parsed messages cache their text views
    start = time.process_time()
    for message in fresh:
        rules.RulesEngine().check(message, envelope)
    rule_time = time.process_time() - start
    return {
        "parse_per_second": count / parse,
        "classify_per_second": count / classify,
        "rules_per_second": count / rule_time,
    }


class _Fixed:
    """A model watcher that always has the same model (no database in a benchmark)."""

    def __init__(self, model: classifier.Model) -> None:
        self.model = model
        self.version = 1

    def current(self) -> classifier.Model:
        return self.model


def main() -> int:
    """Run the benchmark and print the figures beside their targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--speed-messages", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core
    samples = load(args.folds)
    counts = cross_validate(samples, args.folds)
    figures = speed(samples, args.speed_messages)
    result: dict[str, object] = {"corpus": str(CORPUS), "folds": args.folds, **figures}
    for kind, table in counts.items():
        recall, fp = rates(table)
        result[kind] = {"spam_recall": recall, "ham_fp_rate": fp, **table}
    recall, fp = rates(counts["filter"])
    result["spam_recall"], result["ham_fp_rate"] = recall, fp
    ok = recall >= TARGET_RECALL and fp <= TARGET_FP
    ok = ok and figures["classify_per_second"] >= TARGET_RATE
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1
    ham = sum(not s.spam for s in samples)
    print(f"corpus {CORPUS}: {ham} ham, {len(samples) - ham} spam, {args.folds}-fold")
    print(f"threshold {THRESHOLD:g}; each fold scored by a model trained on the others\n")
    print(f"{'':22}{'spam recall':>12}{'ham FP':>9}{'ham held':>10}{'spam passed':>13}")
    for kind, label in (
        ("filter", "rules + classifier"),
        ("classifier", "classifier alone"),
        ("rules", "rules alone"),
    ):
        table = counts[kind]
        recall, fp = rates(table)
        print(f"{label:22}{recall:>12.2%}{fp:>9.2%}{table['ham_held']:>10}{table['spam_pass']:>13}")
    print(f"target: spam recall >= {TARGET_RECALL:.0%} with ham FP <= {TARGET_FP:.1%}\n")
    print(f"one core, {args.speed_messages} messages:")
    print(f"  parsing (reference)        {figures['parse_per_second']:>8.0f} msg/s")
    print(f"  rules engine (reference)   {figures['rules_per_second']:>8.0f} msg/s")
    print(f"  classifier (tokens+score)  {figures['classify_per_second']:>8.0f} msg/s")
    print(f"target: classifier >= {TARGET_RATE:.0f} msg/s")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
