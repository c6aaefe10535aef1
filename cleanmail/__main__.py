"""``python -m cleanmail`` runs the command line."""

from cleanmail.cli import main

main()
