"""Who may listen where: a server reachable from other machines needs a token, or an explicit --insecure.

Every distml entry point that binds a port (`distml serve`, `distml ui`, the gateway and replica
processes) calls `check_exposure` before it binds, so nothing runs open on a network by accident.
"""

from __future__ import annotations

import ipaddress
import logging

from distml.core.errors import DistmlError

log = logging.getLogger("distml.security")

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Is `host` an address only this machine reaches (127.0.0.0/8, ::1, localhost)? Any other name
    counts as exposed: it may resolve to an address others reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(
    host: str,
    token: str | None,
    insecure: bool,
    *,
    risk: str = "deploy, scale or unload models and read their traffic",
    remedy: str = "set DISTML_SERVE_TOKEN (or --token-file FILE)",
    override: str = "pass --insecure",
) -> None:
    """Refuse to listen on a non-loopback `host` without a token unless `insecure` says something else
    (a firewall, a cluster's network policy) guards it; the DistmlError says why and what to do."""
    if token or is_loopback(host):
        return
    shown = host or "all interfaces"
    if insecure:
        log.warning("listening on %s without a token (--insecure): anyone who reaches it can %s", shown, risk)
        return
    raise DistmlError(
        f"refusing to listen on {shown} without a token: anyone who reaches this address could {risk}; "
        f"{remedy}, or {override} if something else (a firewall, a network policy) guards it"
    )


__all__ = ["check_exposure", "is_loopback"]
