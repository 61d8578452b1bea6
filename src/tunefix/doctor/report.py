"""Findings and the report that holds them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")


@dataclass
class Finding:
    """One silent bug: a stable ``code``, a severity, evidence, and the fix if there is one.

    ``fix`` is the human sentence; ``fixer`` names the function in ``doctor.fixes`` that
    applies it (``None`` when the doctor can only explain).
    """

    code: str
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str | None = None
    fixer: str | None = None
    fixed: bool = False

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r}")

    @property
    def fixable(self) -> bool:
        return self.fixer is not None

    def evidence_text(self, limit: int = 160) -> str:
        parts = [f"{k}={_short(v)}" for k, v in self.evidence.items()]
        text = "; ".join(parts)
        return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) > 8:
        return "[" + ", ".join(map(str, value[:8])) + f", ... ({len(value)} in all)]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Report:
    model: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding | None) -> None:
        if finding is not None:
            self.findings.append(finding)

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def get(self, code: str) -> Finding | None:
        return next((f for f in self.findings if f.code == code), None)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error" and not f.fixed]

    @property
    def fixable(self) -> list[Finding]:
        return [f for f in self.findings if f.fixable and not f.fixed]

    def summary(self) -> str:
        counts = {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}
        fixed = sum(1 for f in self.findings if f.fixed)
        text = f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"
        if fixed:
            text += f"; {fixed} fixed"
        return text

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for f in self.findings:
            d = asdict(f)
            d.pop("fixer")
            rows.append(d)
        return {"model": self.model, "findings": rows, "summary": self.summary()}
