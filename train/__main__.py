"""`python -m automodel_convert.train ...`: the same as `automodel-train ...`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
