"""``tunefix doctor``: the findings table (or JSON), and ``--fix OUT_DIR``."""

from __future__ import annotations

from dataclasses import dataclass

from tunefix.commands.build import option, positional


@dataclass
class DoctorOptions:
    model: str = positional()
    """Hugging Face model directory, .gguf file, or hub id in the local cache"""
    template: str | None = None
    """chat template: a registry name or a file"""
    data: str | None = None
    """a data file whose rows are checked against the model"""
    json: bool = False
    """print the report as JSON"""
    fix: str | None = option(metavar="OUT_DIR", default=None)
    """write a repaired copy to OUT_DIR (never the input)"""
    force: bool = False
    """accepted for old scripts: an existing empty --fix directory needs no flag, and a
    non-empty one is never overwritten"""
    trust_remote_code: bool = False
    """run Python code shipped with the model (config auto_map); off by default"""
    allow_pickle: bool = False
    """read pickle weights (.bin/.pt) with torch's weights_only=True; off by default"""


def run_doctor(opts: DoctorOptions) -> int:
    import json

    from rich.console import Console

    from tunefix.doctor import examine, write_fixed
    from tunefix.doctor.cli import print_report

    trust, pickle_ok = opts.trust_remote_code, opts.allow_pickle
    if opts.fix:  # refuse an unusable output before the (slow) examination
        from pathlib import Path

        from tunefix.doctor.repair import check_out_dir

        check_out_dir(Path(opts.fix).expanduser())
    report = examine(opts.model, template=opts.template, data=opts.data, trust_remote_code=trust,
                     allow_pickle=pickle_ok)
    fixed_lines: list[str] = []
    if opts.fix:
        fixed_lines = write_fixed(opts.model, opts.fix, report, trust_remote_code=trust, allow_pickle=pickle_ok)
    if opts.json:
        out = report.to_dict()
        if opts.fix:
            out["fixed_copy"] = opts.fix
            out["fixes"] = fixed_lines
        print(json.dumps(out, indent=2, default=str))
    else:
        console = Console(highlight=False)
        print_report(report, console)
        for line in fixed_lines:
            console.print(f"fixed: {line}")
        if opts.fix:
            console.print(f"repaired copy written to {opts.fix} (the input is unchanged)")
    return 1 if report.errors else 0
