"""The learning classifier from the command line: bootstrap training and evaluation.

Both work on the installation's own database: ``train`` writes the model version that
every filter loads within seconds, ``evaluate`` scores with that version the way the
filter does (rules plus classifier, against the default quarantine threshold).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import click

from cleanmail import audit, learning, mime
from cleanmail.cli import State, cli, pass_state
from cleanmail.filter import classifier, engines, learned, rules, tokenizer

# An mbox "From " line starts the file or follows an empty line.
_FROM_LINE = re.compile(rb"(?:\A|(?<=\n\n)|(?<=\n\r\n))From [^\n]*\n")
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.M)
T = TypeVar("T")


@cli.group("engine")
def engine_group() -> None:
    """The learning classifier: train it from mail folders, and measure it."""


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of one file: a raw message, or an mbox of several (From_ lines dropped)."""
    if not data.startswith(b"From "):
        return [data] if data.strip() else []
    pieces = _FROM_LINE.split(data)
    return [_QUOTED_FROM.sub(rb"\1", piece) for piece in pieces if piece.strip()]


def read_folder(folder: Path) -> Iterator[bytes]:
    """Every message in the files of a folder (and its subfolders), in name order."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            yield from split_mbox(path.read_bytes())


def _load(kind: str, folder: Path) -> list[bytes]:
    messages = list(read_folder(folder))
    if not messages:
        raise click.ClickException(f"no messages in {folder} ({kind})")
    return messages


def progress(items: list[T], label: str) -> contextlib.AbstractContextManager[Iterable[T]]:
    """A progress bar over the items on a terminal; the items alone elsewhere."""
    if sys.stderr.isatty():
        return click.progressbar(items, label=label, file=sys.stderr)
    return contextlib.nullcontext(items)


def _tokens(messages: list[tuple[bytes, bool]], label: str) -> list[tuple[list[str], bool]]:
    """Tokenize every message, with a progress bar on a terminal."""
    out = []
    with progress(messages, label) as bar:
        for raw, spam in bar:
            out.append((tokenizer.tokenize(mime.parse(raw)), spam))
    return out


FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)


@engine_group.command("train")
@click.option("--ham", "ham_dir", type=FOLDER, required=True, help="Folder of wanted mail.")
@click.option("--spam", "spam_dir", type=FOLDER, required=True, help="Folder of spam.")
@click.option("--fresh", is_flag=True, help="Start from nothing rather than the current model.")
@pass_state
def train(state: State, ham_dir: Path, spam_dir: Path, fresh: bool) -> None:
    """Train the classifier on folders of raw messages and store it as a new model version."""
    database = state.database()
    labelled = [(raw, False) for raw in _load("ham", ham_dir)]
    labelled += [(raw, True) for raw in _load("spam", spam_dir)]
    examples = [
        (classifier.indices(tokens), spam) for tokens, spam in _tokens(labelled, "Reading mail")
    ]
    with database.session_scope(write=True) as session:
        base, model = learning.latest_model(session)
        if fresh:
            model = classifier.Model.empty()
        model.train(examples, epochs=1)
        try:
            version = learning.save_model(
                session, model, base, source="train", actor=audit.cli_actor().name
            )
        except learning.ModelConflict as exc:
            raise click.ClickException(f"{exc}; run the training again") from None
    click.echo(
        f"model version {version}: {model.ham} ham and {model.spam} spam learned "
        f"(this run: {len(labelled) - sum(s for _r, s in labelled)} ham, "
        f"{sum(s for _r, s in labelled)} spam)"
    )


@engine_group.command("evaluate")
@click.option("--ham", "ham_dir", type=FOLDER, required=True, help="Folder of wanted mail.")
@click.option("--spam", "spam_dir", type=FOLDER, required=True, help="Folder of spam.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@pass_state
def evaluate(state: State, ham_dir: Path, spam_dir: Path, as_json: bool) -> None:
    """Score folders of known ham and spam with the current model and the rules."""
    database = state.database()
    threshold = state.config.quarantine_threshold
    watcher = learned.ModelWatcher(database)
    scorers: list[engines.Engine] = [rules.RulesEngine(), learned.LearnedEngine(watcher)]
    labelled = [(raw, False) for raw in _load("ham", ham_dir)]
    labelled += [(raw, True) for raw in _load("spam", spam_dir)]
    counts = {(spam, held): 0 for spam in (False, True) for held in (False, True)}
    envelope = engines.Envelope("", ())
    with progress(labelled, "Scoring mail") as bar:
        for raw, spam in bar:
            parsed = mime.parse(raw)
            total = sum(engine.check(parsed, envelope).score for engine in scorers)
            counts[(spam, total >= threshold)] += 1
    ham_total = counts[(False, False)] + counts[(False, True)]
    spam_total = counts[(True, False)] + counts[(True, True)]
    figures = {
        "model_version": watcher.version,
        "threshold": threshold,
        "ham": ham_total,
        "spam": spam_total,
        "spam_recall": counts[(True, True)] / spam_total,
        "ham_fp_rate": counts[(False, True)] / ham_total,
        "confusion": {
            "ham": {"pass": counts[(False, False)], "quarantine": counts[(False, True)]},
            "spam": {"pass": counts[(True, False)], "quarantine": counts[(True, True)]},
        },
    }
    if as_json:
        click.echo(json.dumps(figures, indent=2))
        return
    if watcher.version is None:
        click.echo("no trained model yet: these are the rules alone")
    else:
        click.echo(f"model version {watcher.version}, quarantine threshold {threshold:g}")
    click.echo(f"spam recall:         {figures['spam_recall']:.2%}")
    click.echo(f"ham false positives: {figures['ham_fp_rate']:.2%}")
    click.echo("")
    click.echo(f"{'':12}{'pass':>10}{'quarantine':>12}")
    for name, spam in (("ham", False), ("spam", True)):
        click.echo(f"{name:12}{counts[(spam, False)]:>10}{counts[(spam, True)]:>12}")
