"""Where the OpenAI API parses a body (services/router/openai_parse.py): few JSON values on the
event loop, many in the parser's child process, with the same answer either way; a child that
dies fails its body with UNAVAILABLE and the next body gets a new one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from services.common.errors import DependencyUnavailableError
from services.router import openai_schema as schema
from services.router.openai_parse import INLINE_MAX_VALUES, BodyParser, json_values_bound
from services.router.openai_schema import InvalidFieldError, Kind

# Probe of session 23: 200,000 one-key messages (4 MB, under the body limit) held the router's
# event loop 0.37 s a body; two clients sending them stalled every stream.
MANY_MESSAGES = json.dumps({"messages": [{"role": "system"}] * 200_000}).encode()


@pytest.fixture
def parsed_here(monkeypatch):
    """The bodies ``openai_schema.parse`` saw in this process (a child imports its own)."""
    seen: list[bytes] = []
    real = schema.parse

    def recording(cls, body):
        seen.append(body)
        return real(cls, body)

    monkeypatch.setattr(schema, "parse", recording)
    return seen


def parse(parser: BodyParser, kind: Kind, body: bytes):
    return asyncio.run(parser.parse(kind, body))


def test_the_bound_counts_every_value_and_more():
    body = json.dumps({"prompt": [1, 2, 3], "stop": ["a,b"], "stream": False}).encode()
    assert json_values_bound(body) >= 7  # the object, 3 fields' values, 3 ids (and a comma)
    assert json_values_bound(b"{}") == 2


def test_a_small_body_parses_on_the_loop(parsed_here):
    parser = BodyParser()
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    request = parse(parser, Kind.CHAT, body)
    assert request.messages[0].content == "hi"
    assert parsed_here == [body]
    assert parser._pool is None  # no child started


def test_a_body_of_many_values_parses_in_the_child_with_the_same_answer(parsed_here):
    parser = BodyParser()
    try:
        with pytest.raises(InvalidFieldError) as refused:
            parse(parser, Kind.CHAT, MANY_MESSAGES)
        assert refused.value.param == "messages"
        assert "at most 4096 items" in str(refused.value)
        # A valid one (text with many commas, as a CSV prompt) comes back as parsed inline.
        csv = json.dumps({"prompt": "1," * (INLINE_MAX_VALUES + 1), "max_tokens": 3}).encode()
        request = parse(parser, Kind.COMPLETION, csv)
        assert request == schema.CompletionRequest.model_validate_json(csv)
        assert parsed_here == []  # neither parsed in this process
    finally:
        parser.close()


def test_a_child_that_dies_fails_its_body_unavailable_and_the_next_gets_a_new_one():
    parser = BodyParser(inline_max_values=0)  # every body to the child
    body = json.dumps({"prompt": "hi"}).encode()
    try:
        assert parse(parser, Kind.COMPLETION, body).prompt == "hi"
        [pid] = parser._pool._processes  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)

        async def until_refused():
            for _ in range(100):  # the executor notices the death within its poll
                try:
                    await parser.parse(Kind.COMPLETION, body)
                except DependencyUnavailableError as exc:
                    return exc
                await asyncio.sleep(0.05)
            return None

        refused = asyncio.run(until_refused())
        assert refused is not None and "retry" in str(refused)
        assert parse(parser, Kind.COMPLETION, body).prompt == "hi"
    finally:
        parser.close()


CHILD_OF_A_ROUTER = """
import asyncio, json, sys, time
from services.router.openai_parse import BodyParser
from services.router.openai_schema import Kind
parser = BodyParser(inline_max_values=0)
asyncio.run(parser.parse(Kind.COMPLETION, json.dumps({"prompt": "hi"}).encode()))
print(*parser._pool._processes, flush=True)
time.sleep(60)
"""


def test_the_child_ends_when_its_router_is_killed():
    router = subprocess.Popen([sys.executable, "-c", CHILD_OF_A_ROUTER], stdout=subprocess.PIPE)
    try:
        child = int(router.stdout.readline())
        router.kill()  # SIGKILL: nobody shuts the pool down
        router.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and pid_alive(child):
            time.sleep(0.1)
        assert not pid_alive(child)
    finally:
        router.kill()
        router.wait(10)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone but for its parent's wait: its state in /proc says so.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
