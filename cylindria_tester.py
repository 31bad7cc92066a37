"""Opens the Cylindria tester window: `python cylindria_tester.py`, no install needed."""

import sys
from pathlib import Path

# This file lives in a checkout, so it runs that checkout's tester, whether or not (and
# whichever version of) Cylindria is installed in the running Python.
SRC = Path(__file__).resolve().parent / "src"
if (SRC / "cylindria" / "desktop.py").is_file():
    sys.path.insert(0, str(SRC))

from cylindria.desktop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
