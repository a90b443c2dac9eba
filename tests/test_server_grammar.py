"""The server's grammar handling: request grammars compile off the event loop, before
submission (hetero.server.state.prepare_all, EngineHandle.prepare)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xgrammar")  # the server's extra (installed by scripts/setup.sh)
from test_grammar import SCHEMA, tiny  # noqa: F401, F811  (its fixture)

from hetero.engine.engine import RequestError
from hetero.engine.grammar import GrammarSpec
from hetero.engine.params import SamplingParams


def test_the_server_compiles_grammars_off_its_event_loop(tiny):  # noqa: F811
    """prepare_all compiles each distinct grammar once, in a worker thread (the event loop keeps
    streaming meanwhile); EngineHandle.prepare leaves a bad grammar for submit to refuse."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from hetero.engine.handle import EngineHandle
    from hetero.server.state import prepare_all

    handle = EngineHandle(tiny.engine())
    try:
        calls, prepare = [], handle.prepare

        def spy(params):
            calls.append((params.grammar, threading.current_thread()))
            prepare(params)

        handle.prepare = spy
        state = SimpleNamespace(engine=lambda: SimpleNamespace(handle=handle))
        spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
        params = [SamplingParams(grammar=spec), SamplingParams(grammar=spec), SamplingParams()]

        async def main():
            await prepare_all(state, params)
            return threading.current_thread()

        loop_thread = asyncio.run(main())
        assert [g for g, _ in calls] == [spec] and calls[0][1] is not loop_thread
        assert spec in handle.engine.grammars._compiled  # submit finds it compiled
        bad = SamplingParams(grammar=GrammarSpec("regex", "([a-z"))
        handle.prepare(bad)  # no error here
        with pytest.raises(RequestError, match="regex"):
            handle.submit(tiny.prompt, bad)
    finally:
        handle.close()
