"""The package keeps its layers: the core is plain Python, modules stay small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cylindria"


def test_the_core_and_the_store_run_without_aiohttp():
    probe = ("import sys\n"
             "import cylindria.core.jobs, cylindria.core.placement, cylindria.core.ports\n"
             "import cylindria.core.records, cylindria.core.registry, cylindria.core.workflow\n"
             "import cylindria.store.journal, cylindria.store.database, cylindria.store.inputs\n"
             "import cylindria.store.postgres\n"
             "import cylindria.core.inputs\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_no_module_is_over_five_hundred_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}
