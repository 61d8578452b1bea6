"""The README's tour, run on tiny settings: the README cannot drift from the code."""

import os
import re
import shlex
from pathlib import Path

import pytest

from tunefix import assets
from tunefix.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def tour_commands() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\$ (tunefix [^\n]*?)(?:\s+#.*)?$", README, re.M)]


def test_readme_starts_with_the_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [ln.split("#")[0].strip() for ln in blocks[0].splitlines() if ln.strip()]
    assert lines == ["make demo", "make test"]


@pytest.mark.slow
def test_readme_tour_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = tour_commands()
    assert len(commands) >= 6
    run_dir = tmp_path / "run"
    smol = str(assets.smollm2())
    for cmd in commands:
        cmd = cmd.replace("~/.cache/tunefix/smollm2-135m-instruct", smol)
        cmd = cmd.replace("fixed-smollm2", str(tmp_path / "fixed-smollm2"))
        cmd = cmd.replace("runs/titanic", str(run_dir))
        argv = shlex.split(cmd)[1:]
        if argv[0] == "train":  # tiny settings: one step on a few rows
            argv += ["max_steps=1", "limit_rows=16", f"output_dir={run_dir}"]
        if argv[0] == "eval":
            argv += ["--rows", "10"]
        if argv[0] == "chat":
            argv += ["--max-new-tokens", "4"]
        code = main(argv)
        out = capsys.readouterr()
        # The doctor exits 1 on an error finding; with --fix the errors are fixed in the copy.
        expected = 1 if argv[0] == "doctor" and "--fix" not in argv else 0
        assert code == expected, (cmd, out.err[-500:])
        if argv[0] == "data":
            assert "⟦no<|im_end|>⟧" in out.out
        if argv[0] == "chat":
            assert out.out.strip()
    assert (tmp_path / "fixed-smollm2" / "model.safetensors").exists()
    assert os.path.exists(run_dir / "loss.png")
