"""Re-execute the tutorials in place, so that their committed outputs are a fresh run's.

Usage: ``.venv/bin/python scripts/execute_tutorials.py`` (``tests/test_tutorials.py``
fails when the committed printed outputs differ from a fresh run). Each notebook's
metadata records this machine's floating-point fingerprint (``tests/tutorial_numerics.py``):
the test compares printed numbers exactly only on machines with the same fingerprint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tutorial_numerics import METADATA_KEY, fingerprint  # noqa: E402


def main() -> int:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    numerics = fingerprint()
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        book = nbformat.read(path, as_version=4)
        book.metadata[METADATA_KEY] = {"numerics": numerics}
        nbclient.NotebookClient(
            book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
        nbformat.write(book, path)
        print(f"executed {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
