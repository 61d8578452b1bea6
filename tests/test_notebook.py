"""Issue 7: examples/titanic.ipynb runs top to bottom (the `tunefix demo` path in the Python
API) on tiny settings: its parameters cell is replaced, the notebook is executed with
nbclient in a kernel of this very Python, and its outputs are checked.

The kernel is named by a kernelspec written into the test's temporary directory (found
through ``JUPYTER_PATH``), so neither a user-wide nor a system-wide ``python3`` kernel of
another Python can be picked up, and nothing is installed outside the test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tunefix import tiny

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "titanic.ipynb"
KERNEL = "tunefix-test"


def tiny_parameters(out: Path) -> str:
    # A random tiny Mistral (real Llama 2 tokenizer, 32k vocabulary, no chat template of its own),
    # 2 steps of 8 rows, 20 passengers of which 4 are held out.
    return "\n".join([
        f"MODEL = {str(tiny.tiny_model('mistral'))!r}",
        'TEMPLATE = "mistral"',
        "STEPS = 2",
        "ROWS = 20",
        f"OUTPUT = {str(out / 'runs' / 'nb')!r}",
    ])


def kernelspec(root: Path) -> None:
    """A kernelspec running ipykernel in this Python, one torch thread (a shared CPU)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tunefix test", "language": "python",
        "env": {"OMP_NUM_THREADS": "1", "IPYTHONDIR": str(root / "ipython"), "MPLBACKEND": "Agg"},
    }))


def texts(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    import nbformat
    from nbclient import NotebookClient

    root = tmp_path_factory.mktemp("notebook")
    kernelspec(root / "jupyter")
    work = root / "work"
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code", "one code cell tagged 'parameters'"
    params[0].source = tiny_parameters(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root / "jupyter"))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
        NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(work)}}).execute()
    return nb, work


def test_notebook_runs_without_error(executed):
    nb, _ = executed
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) - 2, "explain each step"


def test_notebook_shows_each_step(executed):
    nb, work = executed
    text = "\n".join(texts(c) for c in nb.cells)
    assert "summary:" in text  # the doctor's report
    assert text.count("trained part in ⟦ ⟧") == 1 and text.count("⟦") >= 3  # header + 2 rows
    # PyTorch before and after, then llama.cpp on each GGUF file
    assert len(re.findall(r"accuracy \d+\.\d% on 4 held-out rows", text)) == 4, text[-3000:]
    assert re.search(r"loss \d+\.\d+ -> \d+\.\d+ in 2 steps", text)
    assert "verified in llama.cpp: yes" in text
    assert "ollama create" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the accuracy chart

    run = work / "runs" / "nb"
    assert (run / "adapter").is_dir() and (run / "loss.png").is_file() and (run / "accuracy.png").is_file()
    export = work / "runs" / "nb-export"
    names = {p.name for p in export.iterdir()}
    assert {"nb-f16.gguf", "nb-q8_0.gguf", "Modelfile", "export.json"} <= names, names
    assert "FROM ./nb-f16.gguf" in (export / "Modelfile").read_text()
