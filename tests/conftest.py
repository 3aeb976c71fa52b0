"""Make ``reference`` (the independent references the tests compare against) importable.

The suite runs with ``--import-mode=importlib``, which keeps the tests folder off ``sys.path``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
