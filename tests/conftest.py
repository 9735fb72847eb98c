import sys
from pathlib import Path

# The tests import the package from the checkout, and `tests.support` as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
