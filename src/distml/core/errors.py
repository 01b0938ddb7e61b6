"""One exception type for bad input of any kind, so every entry point reports it the same way.

`DistmlError` carries a message that names what was wrong and what is expected; the CLI
prints it as one line and exits with status 2, the HTTP layers answer it with 400.
"""


class DistmlError(Exception):
    """Bad input or an unusable environment, described for the user in one message."""


FREE_AND_RETRY = "free space and try again"


class DiskFullError(DistmlError):
    """A write failed because its filesystem is full (ENOSPC) or the user's quota is spent (EDQUOT).

    Carries the path being written, the filesystem's mount point and free bytes, and what the write
    needed when known; `then` says what to do once space is free."""

    def __init__(
        self,
        path: str,
        *,
        mount: str | None = None,
        free: int | None = None,
        needed: int | None = None,
        quota: bool = False,
        then: str = FREE_AND_RETRY,
    ):
        self.path, self.mount, self.free, self.needed, self.quota, self.then = path, mount, free, needed, quota, then
        what = "disk quota exceeded" if quota else "no space left on device"
        facts = []
        if free is not None:
            facts.append(f"the filesystem at {mount or '?'} has {_size(free)} free")
        if needed is not None:
            facts.append(f"{_size(needed)} needed")
        detail = f" ({', '.join(facts)})" if facts else ""
        super().__init__(f"{what} writing {path}{detail}; {then}")


def _size(n: int) -> str:
    """A byte count for people: 512 bytes, 12.0 KiB, 3.4 GiB."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for larger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"
