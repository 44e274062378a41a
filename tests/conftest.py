"""Shared test setup. Runs before any test module imports triton or the kernels.

CPU tests run kernels through Triton's interpreter, which must be chosen before triton is
first imported; tests that compile for real do so in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
