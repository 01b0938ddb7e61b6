"""Memoization keys: when may a step's earlier result stand in for running it again?

The key hashes five parts: the step's name, its code version (`codehash`), its parameter
values bound by name (so keyword order at the call does not matter), the fingerprints of its
upstream inputs, and the fingerprint of outside data it declares. The parts are stored with
each execution so a miss can be explained by comparing them with the last hit's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
from typing import Any

from distml.workflow.codehash import SourceDigests, code_version
from distml.workflow.dag import Node, Step
from distml.workflow.store import StepExecution
from distml.workflow.values import canonical, fingerprint


def bind(step: Step, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name, defaults filled in."""
    bound = step.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, parameter in step.signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


def key_parts(
    node: Node,
    resolved: dict[str, Any],
    data_fingerprint: str | None,
    code_cache: dict[int, Any],
    digests: SourceDigests | None = None,
) -> dict[str, Any]:
    """The memo key's parts for `node` called with `resolved` (stored values, by parameter);
    `code_cache`: code versions by function (this run's), `digests`: parsed source (across runs)."""
    step = node.step
    assert step is not None
    upstream_params = {name for name, raw in bind(step, node.args, node.kwargs).items() if _has_node(raw)}
    if step.policy.version is not None:
        code: dict[str, str] = {"version": step.policy.version}
    else:
        cached = code_cache.get(id(step.fn))
        if cached is None:
            cached = code_cache[id(step.fn)] = code_version(step.fn, digests)
        code = cached.parts
    return {
        "step": step.name,
        "code": code,
        "params": {k: v for k, v in sorted(resolved.items()) if k not in upstream_params},
        "inputs": {k: fingerprint(v) for k, v in sorted(resolved.items()) if k in upstream_params},
        "data": data_fingerprint,
    }


def _has_node(value: Any) -> bool:
    if isinstance(value, Node):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    return False


def memo_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()


def explain_miss(parts: dict[str, Any], previous: StepExecution | None, max_age: float | None) -> str:
    """Why a memoized step runs: what differs from its last successful execution."""
    if previous is None:
        return "no earlier successful execution"
    old = json.loads(previous.memo_parts_json)
    reasons: list[str] = []
    if old.get("code") != parts["code"]:
        before, now = old.get("code") or {}, parts["code"]
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        reasons.append("code changed: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else ""))
    for part, label in (("params", "parameter"), ("inputs", "input")):
        before, now = old.get(part) or {}, parts[part]
        for name in sorted(set(before) | set(now)):
            if before.get(name) != now.get(name):
                if part == "params":
                    reasons.append(f"{label} {name}: {_short(before.get(name))} -> {_short(now.get(name))}")
                else:
                    reasons.append(f"{label} {name} changed")
    if old.get("data") != parts["data"]:
        reasons.append("data changed")
    if not reasons and max_age is not None and previous.finished_at is not None:
        age = (dt.datetime.now(dt.UTC) - previous.finished_at).total_seconds()
        reasons.append(f"expired: the last result is {age:.0f} s old, max_age is {max_age:g} s")
    return "; ".join(reasons) or "the earlier result is no longer available"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."
