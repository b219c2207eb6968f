"""What the soak prints (progress lines) and reads back (JSON lines of its processes)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path`` (none if it does not exist yet)."""
    out: list[dict[str, Any]] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        if line.strip():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def normalise_reason(reason: str) -> str:
    """Group rejection reasons: kids and numbers vary, the cause does not."""
    reason = re.sub(r"[A-Za-z0-9_-]{43}", "<kid>", reason)
    return re.sub(r"\d+", "N", reason)[:160]
