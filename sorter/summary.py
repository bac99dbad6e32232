"""What one scan or reclassification did: counters only, so memory stays flat."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sorter.domain import Status
from sorter.pipeline import Outcome


@dataclass
class RunSummary:
    """Counters of one run; :meth:`to_dict` is the ``--json-summary`` document."""

    files: int = 0  # paths the walk produced
    unchanged: int = 0  # skipped by the ledger: same size and mtime as last time
    registered: int = 0  # new or changed files recorded this run
    duplicates: int = 0  # another path already holds the SOP Instance UID
    resumed: int = 0  # pending instances left by an earlier, interrupted run
    classified: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)  # (header label, predicted)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def count_terminal(self, status: Status, reason: str | None) -> None:
        """Count one ``failed``/``skipped`` instance under its reason."""
        target = self.skipped if status is Status.SKIPPED else self.failed
        target[reason or "unknown"] += 1

    def add_outcomes(self, outcomes: list[Outcome]) -> None:
        """Count a committed batch."""
        for outcome in outcomes:
            if outcome.status is Status.DONE and outcome.prediction is not None:
                self.classified += 1
                self.verdicts[outcome.verdict.value if outcome.verdict else "none"] += 1
                header = outcome.header_label.value if outcome.header_label else "-"
                self.confusion[(header, outcome.prediction.label.value)] += 1
            else:
                self.count_terminal(outcome.status, outcome.error)

    @property
    def discrepancies(self) -> int:
        """Instances whose pixels confidently disagree with their header."""
        return self.verdicts.get("disagree", 0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document of every counter."""
        confusion: dict[str, dict[str, int]] = {}
        for (header, label), n in sorted(self.confusion.items()):
            confusion.setdefault(header, {})[label] = n
        return {
            "files": self.files,
            "unchanged": self.unchanged,
            "registered": self.registered,
            "duplicates": self.duplicates,
            "resumed": self.resumed,
            "classified": self.classified,
            "discrepancies": self.discrepancies,
            "verdicts": dict(sorted(self.verdicts.items())),
            "confusion": confusion,
            "skipped": dict(sorted(self.skipped.items())),
            "failed": dict(sorted(self.failed.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "files_per_s": round(self.files / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
        }
