"""Fuzzing: schemathesis generates requests from the served /openapi.json (examples,
boundary cases, random and invalid data, stateful sequences) against a real gateway with
the scripted upstream behind it. No response may be a 5xx or break the document, invalid
requests must be refused, and the server must be alive afterwards. Bounded in time."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import StartGateway
from scripted_upstream import ScriptedUpstream

# Checks that need resources the fuzzer cannot make (an existing turn id, a second user)
# or that judge valid-looking requests our stricter rules refuse are left out.
EXCLUDED = "positive_data_acceptance,ignored_auth,use_after_free,ensure_resource_availability," \
           "object_level_authorization"


def test_schemathesis_finds_nothing(gateways: StartGateway, upstream: ScriptedUpstream) -> None:
    gateway = gateways("--upstream", upstream.url, "--max-queue-wait-s", "2",
                       "--upstream-timeout-s", "3")
    st = Path(sys.executable).with_name("st")
    # One worker: with two, hypothesis describes filters with ast.parse in two threads at
    # once, which CPython 3.11.7 can fail with a spurious "AST constructor recursion depth
    # mismatch" (python/cpython#106905; seen once in a clean-clone CI run).
    result = subprocess.run(
        [str(st), "run", gateway.url + "/openapi.json", "--url", gateway.url,
         "--checks", "all", "--exclude-checks", EXCLUDED, "--max-examples", "40",
         "--workers", "1", "--request-timeout", "65", "--max-response-time", "65", "--max-time", "60",
         "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=300,
    )
    summary = result.stdout[result.stdout.rfind("SUMMARY"):]
    print(summary)
    cases = re.search(r"(\d+) generated", summary)
    assert cases and int(cases.group(1)) > 150, summary
    assert result.returncode == 0, result.stdout[-8000:]
    with urllib.request.urlopen(gateway.url + "/healthz", timeout=5) as resp:
        assert resp.status == 200, "the server survived"
