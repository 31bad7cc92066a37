"""`python -m cylindria` runs `cylindria serve`."""

import sys

from .cli import main

sys.exit(main())
