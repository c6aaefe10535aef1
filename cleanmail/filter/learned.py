"""The learning classifier as a verdict engine: the newest model in the database, in points.

Score scale: the model gives the log-odds that a message is spam; the engine adds
``POINTS_PER_LOGIT`` points per unit of log-odds, between ``MIN_POINTS`` and
``MAX_POINTS``, to the rules' points. So with the default quarantine threshold of 5,
the classifier alone holds a message it thinks is spam with 92.4 % probability (log-odds
2.5), adds nothing at 50 %, and takes up to 2 points off mail that looks like what
owners released. It never reaches a reject threshold above 8 on its own.
``POINTS_PER_LOGIT`` and ``MIN_POINTS`` were chosen by bench/tune.py on the corpus's
DEV set only; ``MAX_POINTS`` cannot change a verdict at the default threshold.

A brand-new installation has no model: the engine then contributes nothing, and so
does a model that has seen fewer than ``MIN_EXAMPLES`` of either kind.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cleanmail import db, mime
from cleanmail.filter import classifier, engines, tokenizer
from cleanmail.models import ClassifierModel

log = logging.getLogger(__name__)

POINTS_PER_LOGIT = 2.0
MIN_POINTS, MAX_POINTS = -2.0, 8.0
MIN_EXAMPLES = 10
QUIET = 0.5  # fewer points than this are not worth a reason
RELOAD_SECONDS = 5.0
SHARE = 0.2  # a kind of clue is named when it gave at least this share of the points

# What kind of clue a token is, by its prefix; the rest are words of the subject or body.
KINDS = {
    "url": "links",
    "links": "links",
    "part": "layout",
    "charset": "layout",
    "cte": "layout",
    "tag": "layout",
    "mime": "layout",
    "subj": "words",
    "hv": "words",
    "long": "words",
}
HITS = {
    "words": ("CLASSIFIER_WORDING", "known spam wording"),
    "headers": ("CLASSIFIER_HEADERS", "headers like those of known spam"),
    "links": ("CLASSIFIER_LINKS", "links to sites known from spam"),
    "layout": ("CLASSIFIER_LAYOUT", "built like known spam"),
}
HAM_HIT = ("CLASSIFIER_HAM", "resembles mail that people wanted")


def kind(token: str) -> str:
    """Which kind of clue a token is: words, headers, links or layout."""
    prefix, sep, _rest = token.partition(":")
    if not sep:
        return "words"
    return KINDS.get(prefix, "headers")


def points(logit: float) -> float:
    """The classifier's points for a message's log-odds of being spam."""
    return max(MIN_POINTS, min(MAX_POINTS, POINTS_PER_LOGIT * logit))


def explain(
    model: classifier.Model,
    tokens: list[str],
    score: float,
    features: np.ndarray | None = None,
) -> tuple[engines.Hit, ...]:
    """Hits that name the kinds of clue that weighed most, sharing the score between them.

    ``features``: the tokens' feature indices, when the caller has them already.
    """
    if abs(score) < QUIET:
        return ()
    if score < 0:
        return (engines.Hit(HAM_HIT[0], score, HAM_HIT[1]),)
    weights = model.weights[classifier.hashes(tokens) if features is None else features]
    shares: dict[str, float] = {}
    words: list[tuple[float, str]] = []
    # Only the tokens that weigh for spam, still in token order (the sums stay the same).
    positive = np.flatnonzero(~(weights <= 0)).tolist()
    for index, weight in zip(positive, weights[positive].tolist(), strict=True):
        token = tokens[index]
        prefix, colon, rest = token.partition(":")  # kind(token), inline: this runs a lot
        what = KINDS.get(prefix, "headers") if colon else "words"
        shares[what] = shares.get(what, 0.0) + weight
        if not colon:
            words.append((weight, token))
        elif what == "words" and prefix != "long":
            words.append((weight, rest))
    total = sum(shares.values()) or 1.0
    named = {what: share for what, share in shares.items() if share / total >= SHARE}
    if not named:
        named = {"words": 1.0}
    hits = []
    for what, share in sorted(named.items(), key=lambda item: -item[1]):
        code, text = HITS[what]
        if what == "words" and words:
            top = dict.fromkeys(word for _weight, word in sorted(words, reverse=True))
            text = f"{text}: {', '.join(list(top)[:3])}"
        hits.append(engines.Hit(code, round(score * share / sum(named.values()), 2), text))
    return tuple(hits)


class ModelWatcher:
    """The newest model version in the database, checked for every few seconds."""

    def __init__(self, database: db.Database, *, every: float = RELOAD_SECONDS) -> None:
        self.database = database
        self.every = every
        self.version: int | None = None
        self.model: classifier.Model | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()

    def current(self) -> classifier.Model | None:
        """The model to score with (None: none trained yet); reloads when a new one exists."""
        if time.monotonic() - self._checked >= self.every and self._lock.acquire(blocking=False):
            try:
                self.refresh()
            finally:
                self._lock.release()
        return self.model

    def refresh(self) -> None:
        """Look for a newer version now and load it; keep the old one when that fails."""
        self._checked = time.monotonic()
        try:
            with self.database.engine.connect() as connection:
                version = connection.scalar(select(func.max(ClassifierModel.id)))
                if version is None or version == self.version:
                    return
                state = connection.scalar(
                    select(ClassifierModel.state).where(ClassifierModel.id == version)
                )
        except SQLAlchemyError as exc:
            log.warning("classifier: cannot check for a new model: %s", exc)
            return
        try:
            model = classifier.Model.from_bytes(state or b"", learning=False)
        except classifier.ModelError as exc:
            log.error("classifier: model version %s is unreadable: %s", version, exc)
            self.version = version  # do not retry a damaged row every few seconds
            return
        self.model, self.version = model, version
        log.info(
            "classifier: loaded model version %s (%d ham, %d spam)", version, model.ham, model.spam
        )


class LearnedEngine:
    """Scores a message with the newest learned model; nothing until one is trained."""

    name = "classifier"

    def __init__(self, watcher: ModelWatcher) -> None:
        self.watcher = watcher

    def check(
        self, message: mime.ParsedMessage, envelope: engines.Envelope
    ) -> engines.EngineResult:
        """The classifier's points, with reasons naming what weighed most."""
        model = self.watcher.current()
        if model is None or min(model.ham, model.spam) < MIN_EXAMPLES:
            return engines.EngineResult(0.0, ())
        return score(model, tokenizer.tokenize(message))


def score(model: classifier.Model, tokens: list[str]) -> engines.EngineResult:
    """A model's verdict on some tokens, as an engine result."""
    features = classifier.indices(tokens)
    value = points(model.logit(features))
    return engines.EngineResult.from_hits(explain(model, tokens, value, features))
