import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.logger import globalLogPublisher

# The tests import the package from the checkout, and `tests.support` as a module.
ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)
# So do the processes they start (twistd, the tunnel): the checkout's code, not
# whatever version was last installed (a second work tree would test the first's).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True)
def no_tracebacks() -> Iterator[list[Any]]:
    """A test fails if anything logged a failure (a traceback) while it ran."""
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback() for e in failures]
