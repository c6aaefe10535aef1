"""Accuracy and speed of the learning classifier, k-fold over the EVALUATION set.

The shared corpus is split once by a salted hash of the file name (bench/corpus.py):
20 % is the DEV set, on which bench/tune.py chose every corpus-derived constant (the
classifier's step size, its points per log-odds and floor, the rules' scores); the
rest is the EVALUATION set, and only its messages are scored here. The EVALUATION set
is cut into folds by another hash of the file name; every fold is scored by a model
trained from nothing on the other EVALUATION folds plus all of DEV (DEV trains, it is
never scored), in one pass, exactly as ``cleanmail engine train`` trains. The verdict
is the filter's: rules plus classifier against the default quarantine threshold. Then
classification throughput on one core, beside parsing and the rules engine in the same
run (the machine is shared and noisy).

    .venv/bin/python bench/accuracy.py [--folds 5] [--no-dev-training] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]

import corpus  # noqa: E402  (bench/corpus.py: the DEV/EVALUATION split)

from cleanmail import mime  # noqa: E402
from cleanmail.config import Config  # noqa: E402
from cleanmail.filter import classifier, engines, learned, rules  # noqa: E402

THRESHOLD = Config.quarantine_threshold  # the default a domain gets
TARGET_RECALL = 0.95
TARGET_FP = 0.005
TARGET_RATE = 2000.0


def cross_validate(
    samples: list[corpus.Sample], folds: int, dev_training: bool
) -> dict[str, dict[str, int]]:
    """Confusion counts on EVALUATION messages: the filter's verdict, classifier, rules."""
    counts = {
        kind: {"ham_pass": 0, "ham_held": 0, "spam_pass": 0, "spam_held": 0}
        for kind in ("filter", "classifier", "rules")
    }
    evaluation = [s for s in samples if not s.dev]
    dev = [s for s in samples if s.dev] if dev_training else []
    for fold in range(folds):
        model = corpus.train([*(s for s in evaluation if s.fold(folds) != fold), *dev])
        for sample in (s for s in evaluation if s.fold(folds) == fold):
            own = learned.score(model, sample.tokens).score
            label = "spam" if sample.spam else "ham"
            for kind, total in (
                ("filter", sample.rules + own),
                ("classifier", own),
                ("rules", sample.rules),
            ):
                counts[kind][f"{label}_{'held' if total >= THRESHOLD else 'pass'}"] += 1
    return counts


def speed(samples: list[corpus.Sample], count: int) -> dict[str, float]:
    """Messages a second on this one core: parsing alone, and classifying parsed mail."""
    model = corpus.train(samples)
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
    parser.add_argument(
        "--no-dev-training", action="store_true", help="train on EVALUATION folds only"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})  # one core
    samples = corpus.load("all")
    counts = cross_validate(samples, args.folds, not args.no_dev_training)
    figures = speed(samples, args.speed_messages)
    evaluation = [s for s in samples if not s.dev]
    ham = sum(not s.spam for s in evaluation)
    result: dict[str, object] = {
        "corpus": str(corpus.CORPUS),
        "folds": args.folds,
        "scored": "evaluation set only",
        "evaluation": {"ham": ham, "spam": len(evaluation) - ham},
        "dev_training": not args.no_dev_training,
        **figures,
    }
    for kind, table in counts.items():
        recall, fp = corpus.rates(table)
        result[kind] = {"spam_recall": recall, "ham_fp_rate": fp, **table}
    recall, fp = corpus.rates(counts["filter"])
    result["spam_recall"], result["ham_fp_rate"] = recall, fp
    ok = recall >= TARGET_RECALL and fp <= TARGET_FP
    ok = ok and figures["classify_per_second"] >= TARGET_RATE
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if ok else 1
    dev = len(samples) - len(evaluation)
    print(f"corpus {corpus.CORPUS}: {len(samples)} messages")
    print(
        f"scored: the EVALUATION set only, {ham} ham and {len(evaluation) - ham} spam, "
        f"{args.folds}-fold"
    )
    print(
        "trained: the other EVALUATION folds"
        + (f" plus the {dev} DEV messages (never scored)" if not args.no_dev_training else "")
    )
    print(f"constants chosen on DEV alone (bench/tune.py); threshold {THRESHOLD:g}\n")
    print(f"{'':22}{'spam recall':>12}{'ham FP':>9}{'ham held':>10}{'spam passed':>13}")
    for kind, label in (
        ("filter", "rules + classifier"),
        ("classifier", "classifier alone"),
        ("rules", "rules alone"),
    ):
        table = counts[kind]
        recall, fp = corpus.rates(table)
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
