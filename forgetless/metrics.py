"""metrics.jsonl: one JSON object per log or evaluation, flushed as it is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

from forgetless.atomic import atomic_write_text


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int = 0):
        """Opens for appending; records after `resume_step` (a killed run's tail) are dropped."""
        self.path = Path(path)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step(line) <= resume_step]
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # a torn last line: drop it


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
