"""One batch run per output folder at a time: the lock file ``.medseg-batch.lock``.

The lock is created with ``O_CREAT | O_EXCL`` (only one process can create it) and holds the
run's pid, host, start time and a random token. A second run into the same folder is refused
with one sentence naming the first run. A lock left by a run that no longer exists on this
host (killed, crashed; or its pid now belongs to a process started after the lock was written)
is taken over, with a notice; a lock of another host is never taken over (its process cannot
be checked from here).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from ...errors import ConfigError, ImageWriteError
from .manifest import utc_now

__all__ = ["LOCK_NAME", "RunLock"]

#: The lock file's name inside the output folder.
LOCK_NAME = ".medseg-batch.lock"


def _pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists on this host (one we may not signal counts too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch; Linux ``/proc``), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(float(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _read(path: Path) -> dict | None:
    """The lock's content; ``{}`` when unreadable, None when there is no lock."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one output folder, held by this run while it is open.

    Args:
        folder: the output folder (it must exist).

    Attributes:
        path: the lock file.
        notices: sentences for the user (a stale lock taken over).
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.notices: list[str] = []
        self.held = False

    def _content(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": utc_now(), "epoch": time.time(),
                           "token": self.token}) + "\n"

    def _create(self) -> bool:
        """Create the lock file atomically; False when it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise ImageWriteError(f"Cannot write into the output folder {self.path.parent} "
                                  f"({exc.strerror or exc}); choose a folder you can write "
                                  "to.") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self._content())
        return True

    def _stale(self, other: dict) -> bool:
        """Whether ``other``'s run is gone: same host and its pid no longer exists."""
        try:
            pid = int(other.get("pid"))
        except (TypeError, ValueError):
            return False
        if other.get("host") != socket.gethostname():
            return False
        if not _pid_alive(pid):
            return True
        started, written = _process_started(pid), other.get("epoch")
        # the pid was reused: its process began after the lock was written (2 s margin)
        return isinstance(written, (int, float)) and started is not None \
            and started > written + 2

    def _take_over(self, other: dict) -> None:
        """Remove the stale lock ``other`` (only if it is still that one)."""
        moved = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another run removed it first
        if (_read(moved) or {}).get("token") != other.get("token"):
            # Another run took the lock over meanwhile: put its live lock back.
            try:
                os.link(moved, self.path)
            except FileExistsError:
                pass
        moved.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Hold the lock, taking over one a dead run left.

        Raises:
            ConfigError: another run on this or another host holds the folder.
            ImageWriteError: the folder is not writable.
        """
        for _ in range(5):
            if self._create():
                self.held = True
                return
            other = _read(self.path)
            if other is None:
                continue  # released meanwhile
            if not self._stale(other):
                break
            self._take_over(other)
            self.notices.append(
                f"Took over the lock of an earlier run (pid {other.get('pid')}, started "
                f"{other.get('started')}) that no longer runs.")
        other = _read(self.path) or {}
        who = (f"pid {other.get('pid')} on {other.get('host')}, started {other.get('started')}"
               if other else "a run whose lock is unreadable")
        raise ConfigError(
            f"Another batch run ({who}) is writing into {self.path.parent}; wait for it to end "
            f"or choose another output folder (delete {self.path} only if that run is gone).")

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if self.held and (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False
