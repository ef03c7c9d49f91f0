from __future__ import annotations

import sys
from pathlib import Path

# The folder's own modules (run from the folder, as its scripts do) and the monorepo's `common`.
for _path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
