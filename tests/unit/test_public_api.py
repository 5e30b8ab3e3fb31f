"""The public names of ``ledgerflow`` resolve, and importing the CLI leaves the engine alone."""

from __future__ import annotations

import subprocess
import sys

import ledgerflow


def test_every_public_name_resolves_to_its_object() -> None:
    from ledgerflow.client import Client
    from ledgerflow.flow import Flow

    assert ledgerflow.Client is Client and ledgerflow.Flow is Flow
    for name in ledgerflow.__all__:
        assert getattr(ledgerflow, name) is not None
    assert sorted(dir(ledgerflow)) == sorted(ledgerflow.__all__)


def test_the_cli_starts_without_loading_the_engine() -> None:
    # Every CLI call pays for its imports: the client commands need HTTP, not NATS or the store.
    code = (
        "import sys, ledgerflow.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'nats', 'eventsourcing', 'psycopg', 'domain', 'services', 'fastapi'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
