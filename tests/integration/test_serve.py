"""`ledgerflow serve` as a real process: it answers, and SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import nats
import pytest

from infrastructure.nats.names import Names
from infrastructure.settings import Settings

pytestmark = pytest.mark.integration


def start_serving(settings: Settings, prefix: str, *roles: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **settings.as_env(),
        "LEDGERFLOW_SUBJECT_PREFIX": prefix,
    }
    args = [arg for role in roles for arg in ("--role", role)]
    return subprocess.Popen(
        [sys.executable, "-m", "ledgerflow", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def request_until_answered(
    url: str, subject: str, body: dict[str, object], deadline: float
) -> dict[str, object]:
    async with await nats.connect(url) as nc:
        while True:
            try:
                reply = await nc.request(subject, json.dumps(body).encode(), timeout=2)
                answer: dict[str, object] = json.loads(reply.data)
                return answer
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < deadline, "the command service never answered"
                await asyncio.sleep(0.1)  # the process is still starting


def test_the_commands_role_answers_and_stops_cleanly_on_sigterm(
    database_settings: Settings,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    process = start_serving(database_settings, prefix, "commands")
    try:
        subject = Names(prefix).command("register_workflow")
        deadline = time.monotonic() + 30
        reply = asyncio.run(
            request_until_answered(database_settings.nats_url, subject, {"name": "o"}, deadline)
        )
        assert reply["ok"] is True
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "serving commands" in output
    assert "SIGTERM: finishing the work in hand" in output
    assert "stopped" in output
