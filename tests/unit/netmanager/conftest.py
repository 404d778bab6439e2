"""Snapshots for netmanager's unit tests, built by Corral's own metadata code from answers files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agents.metadata_client import Snapshot
from metadata.store import load_answers_bytes

HERE = Path(__file__).parent
ANSWERS = HERE / "answers.jsonl"
API = "2016-07-29"


def objects() -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in ANSWERS.read_text().splitlines() if ln.strip()]


def snapshot_of(objs: list[dict[str, Any]]) -> Snapshot:
    data = "\n".join(json.dumps(o) for o in objs).encode()
    ms = load_answers_bytes(data)
    return Snapshot.from_tree(ms.tree(API, "default"))


@pytest.fixture
def snap() -> Snapshot:
    return snapshot_of(objects())
