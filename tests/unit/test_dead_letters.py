"""Dead letters keep a bounded payload: a junk body of megabytes becomes a marked cut, not a row of megabytes."""

from __future__ import annotations

import json

from router.app import _SourceContext
from sources.swift import SwiftSource


async def test_a_huge_malformed_notification_is_kept_cut_and_says_so(make_headwater):
    # Regression: an 8 MiB junk notification became an 8 MiB row, and listing dead letters returned it whole.
    hw = await make_headwater("null", delivery={"dead_letter_payload_max": "4096"})
    source = SwiftSource(hw.config)
    source._ctx = _SourceContext(hw, "swift")
    junk = json.dumps({"oslo.version": "2.0", "oslo.message": "x" * (2 * 1024 * 1024)}).encode()
    assert await source.handle(junk) is None
    resp = await hw.client.get("/v1/deadletters")
    raw = await resp.read()
    assert resp.status == 200 and len(raw) < 16 * 1024, len(raw)
    (letter,) = json.loads(raw)["deadletters"]
    assert letter["payload"]["truncated"] is True and letter["payload"]["size"] > 2 * 1024 * 1024
    assert len(letter["payload"]["head"].encode()) <= 4096
    assert "truncated to 4096" in letter["reason"] and "dead_letter_payload_max" in letter["reason"]
    assert letter["reason"].startswith("malformed swift notification: oslo.message is not a JSON document")


async def test_a_small_payload_is_kept_whole(make_headwater):
    hw = await make_headwater("null")
    await hw.executions.delivery.record_dead_letter(source="zaqar", reason="bad", payload={"a": [1, 2]},
                                                    event_id=None, project_id="default")
    (letter,) = (await (await hw.client.get("/v1/deadletters")).json())["deadletters"]
    assert letter["payload"] == {"a": [1, 2]} and letter["reason"] == "bad"
