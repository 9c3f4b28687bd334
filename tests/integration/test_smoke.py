from __future__ import annotations

import httpx


async def test_create_then_get(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    created = await api.post("/sessions", json={"metadata": {"bot": "menu"}}, headers=headers)
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    got = await api.get(f"/sessions/{sid}", headers=headers)
    assert got.status_code == 200
    assert got.json()["metadata"]["bot"] == "menu"
    assert got.headers["etag"] == '"1"'
