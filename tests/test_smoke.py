"""Smoke test of the fixtures: session and Core/echo (RFC 8620 §2, §4)."""
from conftest import CORE


def test_smoke_echo(client):
    resp = client.request([["Core/echo", {"hello": True}, "b3ff"]], using=[CORE])
    assert resp["methodResponses"] == [["Core/echo", {"hello": True}, "b3ff"]]
