"""``tunefix doctor``: the findings table (or JSON), and ``--fix OUT_DIR``."""

from __future__ import annotations

import argparse
import json

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


def run_doctor(args: argparse.Namespace) -> int:
    from tunefix.doctor import examine, write_fixed

    console = Console(highlight=False)
    trust, pickle_ok = getattr(args, "trust_remote_code", False), getattr(args, "allow_pickle", False)
    if args.fix:  # refuse an unusable output before the (slow) examination
        from pathlib import Path

        from tunefix.doctor.repair import check_out_dir

        check_out_dir(Path(args.fix).expanduser())
    report = examine(args.model, template=args.template, data=args.data, trust_remote_code=trust,
                     allow_pickle=pickle_ok)
    fixed_lines: list[str] = []
    if args.fix:
        fixed_lines = write_fixed(args.model, args.fix, report, trust_remote_code=trust, allow_pickle=pickle_ok)
    if args.json:
        out = report.to_dict()
        if args.fix:
            out["fixed_copy"] = args.fix
            out["fixes"] = fixed_lines
        print(json.dumps(out, indent=2, default=str))
    else:
        print_report(report, console)
        for line in fixed_lines:
            console.print(f"fixed: {line}")
        if args.fix:
            console.print(f"repaired copy written to {args.fix} (the input is unchanged)")
    return 1 if report.errors else 0
