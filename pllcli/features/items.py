"""The unit featurize works on: an input `Item` (a file, or a segment of one) and a `Skip`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Item:
    id: str
    path: str          # resolved path
    line: int          # manifest line (0 for directory scans)
    meta: dict[str, str] = field(default_factory=dict)
    onset: float | None = None    # segment of the file, seconds (None: the whole file)
    offset: float | None = None


@dataclass
class Skip:
    id: str
    path: str
    line: int
    reason: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "line": self.line, "reason": self.reason, "detail": self.detail}
