"""Write docs/cli.md from the CLI's command tree: ``python -m ledgerflow.cli_docs [--check]``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main

from ledgerflow.cli import EXIT_MEANINGS, app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
PROGRAM = "ledgerflow"

_DEFAULT = re.compile(r"\s*\[default: (?P<value>[^\]]*)\]")
_REQUIRED = re.compile(r"\s*\[required\]")


def render() -> str:
    """The whole reference, in Markdown."""
    root = typer.main.get_command(app)
    context = root.context_class(root, info_name=PROGRAM)
    lines = [
        "# The `ledgerflow` command line",
        "",
        "<!-- Generated from the CLI by `make cli-docs` (`python -m ledgerflow.cli_docs`): "
        "edit ledgerflow/cli.py, not this file. -->",
        "",
        _text(root.help),
        "",
        "```",
        f"{PROGRAM} [GLOBAL OPTIONS] COMMAND [ARGS]...",
        "```",
        "",
        "Global options go before the command: `ledgerflow -o json runs list`. `start`, `send`",
        "and `runs` talk to the HTTP API (`--api-url`), so they work the same against",
        "`ledgerflow serve` and `ledgerflow dev`",
        "([ADR 10](adr/0010-cli-talks-to-the-http-api.md)).",
        "With `-o json`, stdout holds exactly one JSON document: the API's answer, or",
        '`{"ok": false, "error": {"code", "message", "details"}}`.',
        "",
        "## Global options",
        "",
        *_options(root, context),
        "",
        "## Exit status",
        "",
        "| status | meaning |",
        "|---|---|",
        *(f"| {int(code)} | {_cell(meaning)} |" for code, meaning in EXIT_MEANINGS.items()),
        "",
        "## Commands",
        "",
    ]
    commands = list(_walk(root, context))
    for path, command, _ in commands:
        summary = command.get_short_help_str(limit=200)
        lines.append(f"- [`{path}`](#{_anchor(path)}): {summary}")
    for path, command, ctx in commands:
        lines += ["", f"### `{path}`", "", _text(command.help), ""]
        lines += ["```", _usage(command, ctx), "```"]
        arguments = _arguments(command, ctx)
        if arguments:
            lines += ["", *arguments]
        options = _options(command, ctx)
        if options:
            lines += ["", *options]
    return "\n".join(lines) + "\n"


def _walk(group: Any, context: Any) -> Iterator[tuple[str, Any, Any]]:
    """Every command that runs something (groups are walked into), in ``--help`` order."""
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None or command.hidden:
            continue
        ctx = command.context_class(command, info_name=name, parent=context)
        if hasattr(command, "list_commands"):
            yield from _walk(command, ctx)
        else:
            yield ctx.command_path, command, ctx


def _usage(command: Any, ctx: Any) -> str:
    pieces = ["[OPTIONS]"]
    for param in command.params:
        if param.param_type_name == "argument" and not param.hidden:
            name = (param.name or "").upper()
            name += "..." if param.nargs == -1 or param.multiple else ""
            pieces.append(name if param.required else f"[{name}]")
    path = ctx.command_path.replace(PROGRAM, f"{PROGRAM} [GLOBAL OPTIONS]", 1)
    return " ".join([path, *pieces])


def _arguments(command: Any, ctx: Any) -> list[str]:
    rows = []
    for param in command.params:
        if param.param_type_name != "argument" or param.hidden:
            continue
        record = param.get_help_record(ctx)
        help_text = record[1] if record else getattr(param, "help", "") or ""
        help_text = _REQUIRED.sub("", help_text)
        name = (param.name or "").upper()
        rows.append(f"| `{name}` | {'yes' if param.required else 'no'} | {_cell(help_text)} |")
    if not rows:
        return []
    return ["| argument | required | help |", "|---|---|---|", *rows]


def _options(command: Any, ctx: Any) -> list[str]:
    rows = []
    for param in command.params:
        if param.param_type_name != "option" or param.hidden:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        found = _DEFAULT.search(help_text)
        help_text = _DEFAULT.sub("", help_text)
        # Click adds a number's range to its default: "[default: 50; 1<=x<=500]".
        default, _, limits = found["value"].partition("; ") if found else ("", "", "")
        if limits:
            help_text += f" [{limits}]"
        if param.required:
            help_text, shown = _REQUIRED.sub("", help_text), "required"
        elif getattr(param, "is_flag", False) and param.default is False:
            shown = "off"
        else:
            shown = f"`{default}`" if default else ""
        rows.append(f"| `{_cell(names)}` | {_cell(shown)} | {_cell(help_text)} |")
    help_names = ", ".join(command.get_help_option_names(ctx))
    rows.append(f"| `{help_names}` | | Show the help and exit. |")
    return ["| option | default | help |", "|---|---|---|", *rows]


def _text(help_text: str | None) -> str:
    return (help_text or "").strip()


def _cell(text: str) -> str:
    """Text fit for a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _anchor(title: str) -> str:
    """GitHub's anchor for a ``### `title` `` heading."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    parser.add_argument("path", nargs="?", type=Path, default=DOCS)
    args = parser.parse_args()
    text = render()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            sys.exit(f"{args.path} is stale: run `make cli-docs`")
        return
    args.path.write_text(text)
    print(f"wrote {args.path}")


if __name__ == "__main__":
    main()
