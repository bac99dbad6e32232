"""What one scan or reclassification did: counters only, so memory stays flat."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sorter.domain import Outcome, Status


@dataclass
class RunSummary:
    """Counters of one run; :meth:`to_dict` is the ``--json-summary`` document."""

    files: int = 0  # paths the walk produced
    unchanged: int = 0  # skipped by the ledger: same size and mtime as last time
    registered: int = 0  # new or changed files recorded this run
    duplicates: int = 0  # another path already holds the SOP Instance UID
    reused_uids: int = 0  # of the duplicates, those from another series: another image, not classified
    resumed: int = 0  # pending instances left by an earlier, interrupted run
    classified: int = 0
    queued: int = 0  # instances sent to the broker for ``sorter worker`` (SORTER_BROKER_URL)
    verdicts: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)  # (header label, predicted)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    # Classified instances whose file could not be read again, by reason (kept as they were).
    not_read_again: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    # Where the classifying process spent its time (LocalExecutor.stage_seconds),
    # and what ran the model: the way to see which stage bounds a run.
    stage_s: dict[str, float] = field(default_factory=dict)
    model_runtime: str | None = None
    model_images_here: int = 0

    def count_terminal(self, status: Status, reason: str | None) -> None:
        """Count one ``failed``/``skipped`` instance under its reason."""
        target = self.skipped if status is Status.SKIPPED else self.failed
        target[reason or "unknown"] += 1

    def add_outcomes(self, outcomes: list[Outcome]) -> None:
        """Count a committed batch."""
        for outcome in outcomes:
            if outcome.kept:
                self.not_read_again[outcome.error or "unknown"] += 1
            elif outcome.status is Status.DONE and outcome.prediction is not None:
                self.classified += 1
                self.verdicts[outcome.verdict.value if outcome.verdict else "none"] += 1
                header = outcome.header_label.value if outcome.header_label else "-"
                self.confusion[(header, outcome.prediction.label.value)] += 1
            else:
                self.count_terminal(outcome.status, outcome.error)

    def add_stages(self, stage_seconds: Mapping[str, float], images_here: int, runtime: str) -> None:
        """Record an executor's time per stage, the images its process ran, and what ran them."""
        for name, seconds in stage_seconds.items():
            self.stage_s[name] = self.stage_s.get(name, 0.0) + seconds
        self.model_images_here += images_here
        self.model_runtime = runtime

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
            "reused_uids": self.reused_uids,
            "resumed": self.resumed,
            "classified": self.classified,
            "queued": self.queued,
            "discrepancies": self.discrepancies,
            "verdicts": dict(sorted(self.verdicts.items())),
            "confusion": confusion,
            "skipped": dict(sorted(self.skipped.items())),
            "failed": dict(sorted(self.failed.items())),
            "not_read_again": dict(sorted(self.not_read_again.items())),
            "elapsed_s": round(self.elapsed_s, 3),
            "files_per_s": round(self.files / self.elapsed_s, 1) if self.elapsed_s > 0 else None,
            "model_runtime": self.model_runtime,
            "model_images_here": self.model_images_here,
            "stage_s": {name: round(s, 3) for name, s in sorted(self.stage_s.items())},
        }

    def stage_line(self) -> str | None:
        """One line on what bounded the run, or ``None`` when no model ran in this process's executor.

        ``model`` is the share of the run this process spent in forward passes
        (each ends in a copy back, so on CUDA it includes the GPU's time);
        ``decode_wait`` the share it sat waiting for decoded files. ``model``
        near 100 % with ``decode_wait`` near 0 means the model stage bounds the
        run; whether that is the GPU or the CPU launching its kernels, the GPU's
        utilisation tells (README, Performance).
        """
        if self.model_runtime is None or self.elapsed_s <= 0:
            return None
        where = f"{self.model_images_here} images" if self.model_images_here else "in the decode processes"
        shares = ", ".join(
            f"{name} {self.stage_s.get(name, 0.0):.1f} s ({self.stage_s.get(name, 0.0) / self.elapsed_s:.0%})"
            for name in ("model", "decode_wait", "write")
        )
        return f"stages: {shares} of {self.elapsed_s:.1f} s; model {self.model_runtime}, {where}"
