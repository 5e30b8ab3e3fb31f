"""docs/cli.md is the CLI's own command tree: it lists every command and is never stale."""

from __future__ import annotations

from ledgerflow import cli
from ledgerflow.cli_docs import DOCS, render


def test_docs_cli_md_is_what_the_cli_generates() -> None:
    assert DOCS.read_text() == render(), "docs/cli.md is stale: run `make cli-docs`"


def test_the_reference_has_every_command_every_option_and_every_exit_status() -> None:
    text = render()
    for path in (
        "ledgerflow start",
        "ledgerflow send",
        "ledgerflow runs list",
        "ledgerflow runs show",
        "ledgerflow runs history",
        "ledgerflow runs cancel",
        "ledgerflow runs retry",
        "ledgerflow serve",
        "ledgerflow worker",
    ):
        assert f"### `{path}`" in text
    for option in ("--api-url", "--nats-url", "--input", "--wait", "--timeout", "--cursor"):
        assert f"{option} " in text or f"{option}`" in text
    for code, meaning in cli.EXIT_MEANINGS.items():
        assert f"| {int(code)} | {meaning} |" in text
    assert set(cli.EXIT_MEANINGS) == set(cli.Exit)


def test_every_command_says_what_it_does() -> None:
    sections = render().split("\n### ")[1:]
    assert len(sections) >= 13
    for section in sections:
        title, _, body = section.partition("\n\n")
        assert not body.startswith("```"), f"{title} has no help text"
