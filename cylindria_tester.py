"""Opens the Cylindria tester window: `python cylindria_tester.py` in a Python that has
Cylindria's dependencies (aiohttp), such as the checkout's `.venv/bin/python`."""

import sys
from pathlib import Path

# This file lives in a checkout, so it runs that checkout's tester, whether or not (and
# whichever version of) Cylindria is installed in the running Python.
SRC = Path(__file__).resolve().parent / "src"
if (SRC / "cylindria" / "desktop.py").is_file():
    sys.path.insert(0, str(SRC))

try:
    from cylindria.desktop import main
except ModuleNotFoundError as exc:
    if (exc.name or "").partition(".")[0] == "cylindria":
        raise
    # The tester calls Cylindria through its Python client, which needs aiohttp.
    sys.exit(f"cylindria tester needs Cylindria's dependencies ({exc.name} is missing "
             f"from {sys.executable}): run `make install`, then `.venv/bin/cylindria "
             "tester`; or `pip install -e .` in this Python.")

if __name__ == "__main__":
    sys.exit(main())
