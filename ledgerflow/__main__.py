"""``python -m ledgerflow`` runs the CLI."""

from ledgerflow.cli import main

main()
