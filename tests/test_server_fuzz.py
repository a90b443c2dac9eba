"""schemathesis generates bodies from the server's OpenAPI schema (valid and invalid ones) and
sends them to `hetero serve` on a tiny random model: no 5xx. The API key is checked too."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from hetero.testing import write_tiny_v3
from hetero.testing.server import ServerProcess

KEY = "sk-test-0123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_v3(tmp_path_factory.mktemp("tiny"))
    # a small pool bounds every generation (and max_tokens beyond it is a 400)
    args = ["--model", str(model), "--kv-cache-tokens", "128", "--api-key", KEY]
    with ServerProcess(args, tmp_path_factory.mktemp("fuzz") / "serve.log") as srv:
        yield srv


def test_no_server_errors(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.include(path_regex="^/v1/").get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    auth = {"Authorization": f"Bearer {KEY}"}
    for operation in operations:

        @given(operation.as_strategy())
        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )  # the same cases every run: CI does not flake on a new draw (found cases become tests)
        def check(case):
            case.headers = {**(case.headers or {}), **auth}
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["type"], response.text

        check()


def test_api_key(server):
    url = server.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # outside /v1: open
