"""The doctor's report on a terminal (rich): the findings table and its summary line.

The command itself (options, ``--json``, ``--fix``) is ``tunefix.commands.doctor``; the demo
prints its doctor step with ``doctor_and_print``.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunefix.doctor.report import Report

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def findings_table(report: Report) -> Table:
    # Every cell is a Text, not a str: a str is read as rich markup, and the findings quote
    # templates and tokens such as "[/INST]" or "[INST]", which rich takes for its own tags.
    table = Table(title=Text(f"tunefix doctor: {report.model}"), show_lines=True, expand=True)
    for col, ratio in (("code", 2), ("severity", 1), ("what", 4), ("evidence", 4), ("fix", 3)):
        table.add_column(col, ratio=ratio, overflow="fold")
    for f in report.findings:
        sev = f.severity + (" (fixed)" if f.fixed else "")
        table.add_row(Text(f.code), Text(sev, style=_STYLE[f.severity]), Text(f.message),
                      Text(f.evidence_text(400)), Text(f.fix or "-"))
    return table


def print_report(report: Report, console: Console) -> None:
    if report.findings:
        console.print(findings_table(report))
    else:
        console.print(Text(f"tunefix doctor: {report.model}: no findings"))
    console.print(f"summary: {report.summary()}", highlight=False)


def doctor_and_print(model: str, console: Console, template: str | None = None,
                     data: str | None = None) -> Report:
    from tunefix.doctor import examine

    report = examine(model, template=template, data=data)
    print_report(report, console)
    return report

