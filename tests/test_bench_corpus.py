"""The accuracy bench's split: constants are tuned on DEV, and only EVALUATION mail is scored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import accuracy
import corpus

from tests.messages import message


def test_dev_is_a_fifth_by_name_and_independent_of_the_folds():
    names = [f"easy_ham__{n:05}.{n * 7919:x}" for n in range(5000)]
    dev = [name for name in names if corpus.is_dev(name)]
    assert 0.18 < len(dev) / len(names) < 0.22
    assert [corpus.is_dev(name) for name in names] == [corpus.is_dev(name) for name in names]
    # The split's own salt: DEV messages fall into every fold alike.
    per_fold = [sum(corpus.fold_of(name, 5) == k for name in dev) for k in range(5)]
    assert min(per_fold) > 0.8 * len(dev) / 5


@pytest.fixture
def small_corpus(tmp_path, monkeypatch):
    """A corpus folder of 40 ham and 40 spam files, with their names by set."""
    names: dict[bool, list[str]] = {True: [], False: []}
    for label in ("ham", "spam"):
        (tmp_path / label).mkdir()
        for n in range(40):
            name = f"{label}__{n:03}"
            body = "lunch meeting agenda\n" if label == "ham" else "cheap pills casino prize\n"
            (tmp_path / label / name).write_bytes(message(subject=f"{label} {n}", body=body))
            names[corpus.is_dev(name)].append(name)
    monkeypatch.setattr(corpus, "CORPUS", tmp_path)
    return names


def test_tuning_reads_only_dev_mail(small_corpus):
    assert sorted(s.name for s in corpus.load("dev")) == sorted(small_corpus[True])
    assert sorted(s.name for s in corpus.load("eval")) == sorted(small_corpus[False])


def test_accuracy_scores_evaluation_mail_only_and_trains_on_dev_too(small_corpus, monkeypatch):
    samples = corpus.load("all")
    trained: list[set[str]] = []
    real_train = corpus.train

    def recording_train(chosen):
        chosen = list(chosen)
        trained.append({s.name for s in chosen})
        return real_train(chosen)

    monkeypatch.setattr(corpus, "train", recording_train)
    counts = accuracy.cross_validate(samples, 5, dev_training=True)
    evaluation = [s for s in samples if not s.dev]
    assert all(sum(table.values()) == len(evaluation) for table in counts.values())
    assert len(trained) == 5
    for fold, names in enumerate(trained):
        assert set(small_corpus[True]) <= names  # DEV trains every fold
        assert not names & {s.name for s in evaluation if s.fold(5) == fold}
    assert counts["classifier"]["spam_held"] > 0 and counts["classifier"]["ham_held"] == 0

    trained.clear()
    accuracy.cross_validate(samples, 5, dev_training=False)
    assert all(not names & set(small_corpus[True]) for names in trained)
