"""
The state directory: projects deployed through the API, kept across restarts.

The file is replaced atomically (a temporary file in the same directory,
fsync, rename, fsync of the directory), so a crash leaves either the old or
the new list, never half of one. A file that does not parse stops start-up
with a message that says so, rather than starting without those projects.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from portrouter.config import ConfigError, JSONProblem, parse_projects, read_json
from portrouter.model import Limits, Project

FILE = "projects.json"
VERSION = 1
NOTHING_STARTED = ("Nothing was started; restore it, or move it aside to start without the "
                   "projects deployed through the API")


class StateError(Exception):
    """The state file cannot be read; the message says which file and why."""


class State:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, FILE)

    def load(self, defaults: Limits) -> list[Project]:
        """The API-deployed projects, validated as the API validates them."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            data = read_json(raw)
        except json.JSONDecodeError as e:
            raise StateError(
                f"{self.path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                f"it may be truncated or corrupt. {NOTHING_STARTED}"
            ) from None
        except JSONProblem as e:
            # The same strict reader as the API's bodies: nothing the API
            # refuses can come back in through the file.
            problem = str(e).removeprefix("is ")
            raise StateError(f"{self.path}: {problem}; it may be corrupt. {NOTHING_STARTED}") from None
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is not int or version != VERSION or not isinstance(data.get("projects"), list):
            raise StateError(f"{self.path}: not a portrouter state file (version {VERSION})")
        try:
            # The file is written from a table, where names are unique: two of
            # one name mean it was edited, and neither can be chosen.
            projects = parse_projects(data["projects"], defaults, static=False)
        except ConfigError as e:
            raise StateError(f"{self.path}: {e}") from None
        return projects

    def save(self, projects: Iterable[Project]) -> None:
        """Replace the file atomically with these projects' manifests."""
        os.makedirs(self.directory, exist_ok=True)
        data = {"version": VERSION, "projects": [dict(p.manifest) for p in projects]}
        # allow_nan=False: a NaN or Infinity written here would stop the next start-up.
        body = json.dumps(data, indent=2, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            # The old file stands, and no half-written temporary is left behind.
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # The rename was the commit: the new list is what is read from now on,
        # so a failure to make the rename durable must not report the change
        # as not made.
        try:
            dirfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        except OSError:
            pass
