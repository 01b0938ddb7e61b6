"""Server-side SVG for `distml ui`: a run's DAG, a model version's lineage and line charts.

Drawn on the server so that pages read without JavaScript and no chart library ships: a DAG is
laid out in layers (each node one column right of its deepest upstream), a fan-out's nodes of one
step fold into one group node until it is opened, and every text is escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

STATE_COLOURS = {
    "succeeded": "#2e7d32",
    "cached": "#00838f",
    "running": "#1565c0",
    "failed": "#c62828",
    "upstream_failed": "#ad1457",
    "cancelled": "#6d4c41",
    "skipped": "#757575",
    "pending": "#9e9e9e",
    "waiting": "#9e9e9e",
    "queued": "#9e9e9e",
    # lineage boxes, by kind
    "data": "#6a1b9a",
    "training": "#1565c0",
    "model": "#2e7d32",
    "serving": "#2e7d32",
    "ended": "#757575",
    "gone": "#c62828",
    "unknown": "#ef6c00",
}
NODE_W, NODE_H, GAP_X, GAP_Y = 190, 54, 60, 18


@dataclass
class DagNode:
    """One box of a DAG: a step execution, or a folded group of a fan-out's nodes."""

    id: str
    label: str
    state: str
    detail: str = ""
    upstream: list[str] = field(default_factory=list)
    href: str | None = None
    members: list[str] = field(default_factory=list)  # a group's node ids


def fold_fanouts(nodes: list[DagNode], open_steps: set[str], step_of: dict[str, str]) -> list[DagNode]:
    """Fold the nodes of one step that share their upstream (a `step.map`) into one group node,
    unless the step is in `open_steps`; the group's state is the worst of its members'."""
    groups: dict[tuple[str, tuple[str, ...]], list[DagNode]] = {}
    for node in nodes:
        groups.setdefault((step_of.get(node.id, node.id), tuple(sorted(node.upstream))), []).append(node)
    member_of: dict[str, str] = {}
    out: list[DagNode] = []
    for (step, upstream), members in groups.items():
        if len(members) < 2 or step in open_steps:
            out.extend(members)
            continue
        group_id = f"{step}[*]"
        for member in members:
            member_of[member.id] = group_id
        states = [m.state for m in members]
        state = next((s for s in ("failed", "upstream_failed", "running", "pending") if s in states), states[0])
        counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        out.append(
            DagNode(group_id, f"{step} ×{len(members)}", state, counts, list(upstream), None, [m.id for m in members])
        )
    for node in out:
        node.upstream = list(dict.fromkeys(member_of.get(u, u) for u in node.upstream))
    return out


def _layers(nodes: list[DagNode]) -> dict[str, int]:
    known = {n.id for n in nodes}
    by_id = {n.id: n for n in nodes}
    depth: dict[str, int] = {}

    def visit(node_id: str, trail: frozenset[str] = frozenset()) -> int:
        if node_id in depth:
            return depth[node_id]
        ups = [u for u in by_id[node_id].upstream if u in known and u not in trail]
        depth[node_id] = 1 + max((visit(u, trail | {node_id}) for u in ups), default=-1)
        return depth[node_id]

    for node in nodes:
        visit(node.id)
    return depth


def dag(nodes: list[DagNode]) -> str:
    """The DAG as an SVG: layers left to right, edges from each upstream, boxes coloured by state."""
    if not nodes:
        return '<p class="empty">no steps recorded</p>'
    depth = _layers(nodes)
    columns: dict[int, list[DagNode]] = {}
    for node in nodes:
        columns.setdefault(depth[node.id], []).append(node)
    place: dict[str, tuple[int, int]] = {}
    for column, members in columns.items():
        for row, node in enumerate(members):
            place[node.id] = (20 + column * (NODE_W + GAP_X), 20 + row * (NODE_H + GAP_Y))
    width = 40 + (max(columns) + 1) * (NODE_W + GAP_X) - GAP_X
    height = 40 + max(len(m) for m in columns.values()) * (NODE_H + GAP_Y) - GAP_Y
    parts = [f'<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for node in nodes:
        x, y = place[node.id]
        for up in node.upstream:
            if up in place:
                ux, uy = place[up]
                parts.append(
                    f'<path class="edge" d="M{ux + NODE_W},{uy + NODE_H // 2} C{ux + NODE_W + GAP_X // 2},'
                    f'{uy + NODE_H // 2} {x - GAP_X // 2},{y + NODE_H // 2} {x},{y + NODE_H // 2}"/>'
                )
    for node in nodes:
        parts.append(_box(node, *place[node.id]))
    parts.append("</svg>")
    return "".join(parts)


def _box(node: DagNode, x: int, y: int) -> str:
    colour = STATE_COLOURS.get(node.state, "#9e9e9e")
    label, detail = escape(node.label[:28]), escape(node.detail[:34])
    group = ' data-group="1"' if node.members else ""
    box = (
        f'<g class="node" data-node-id="{escape(node.id)}" data-state="{escape(node.state)}"{group}>'
        f"<title>{escape(node.label)}: {escape(node.state)} {escape(node.detail)}</title>"
        f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{colour}"/>'
        f'<text x="{x + 8}" y="{y + 20}" class="label">{label}</text>'
        f'<text x="{x + 8}" y="{y + 40}" class="detail">{escape(node.state)} {detail}</text></g>'
    )
    return f'<a href="{escape(node.href)}">{box}</a>' if node.href else box


# -- lineage: columns of boxes from the data to where the model serves ------------------------------


def columns(cols: Sequence[tuple[str, Sequence[tuple[str, str, str | None]]]]) -> str:
    """Columns of (title, [(label, kind, href)]) left to right, each box joined to every box of the
    next column: the lineage of a model version from its data snapshots to its deployments."""
    cols = [(title, items) for title, items in cols if items]
    if not cols:
        return '<p class="empty">nothing recorded</p>'
    width = 40 + len(cols) * (NODE_W + GAP_X) - GAP_X
    height = 60 + max(len(items) for _, items in cols) * (NODE_H + GAP_Y)
    parts = [f'<svg class="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    spots: list[list[tuple[int, int]]] = []
    for c, (title, items) in enumerate(cols):
        x = 20 + c * (NODE_W + GAP_X)
        parts.append(f'<text x="{x}" y="16" class="heading">{escape(title)}</text>')
        spots.append([(x, 30 + r * (NODE_H + GAP_Y)) for r in range(len(items))])
    for c in range(len(cols) - 1):
        for x, y in spots[c]:
            for nx, ny in spots[c + 1]:
                parts.append(f'<path class="edge" d="M{x + NODE_W},{y + NODE_H // 2} L{nx},{ny + NODE_H // 2}"/>')
    for c, (_title, items) in enumerate(cols):
        for (label, kind, href), (x, y) in zip(items, spots[c]):
            parts.append(_box(DagNode(label, label, kind, "", [], href), x, y).replace('class="node"', 'class="lnode"'))
    parts.append("</svg>")
    return "".join(parts)


# -- charts ----------------------------------------------------------------------------------------


def line_chart(
    series: dict[str, Iterable[tuple[float, float]]], title: str, width: int = 560, height: int = 200
) -> str:
    """Lines of (x, y) points, one per series, with the axes' ranges written at the corners."""
    data = {name: [(float(x), float(y)) for x, y in points] for name, points in series.items()}
    points = [p for values in data.values() for p in values]
    if not points:
        return f'<p class="empty">{escape(title)}: no data yet</p>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 60) / ((x1 - x0) or 1)
    sy = (height - 40) / ((y1 - y0) or 1)
    palette = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f")
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="50" y="14" class="heading">{escape(title)}</text>',
        f'<text x="2" y="30" class="axis">{_num(y1)}</text>',
        f'<text x="2" y="{height - 12}" class="axis">{_num(y0)}</text>',
        f'<text x="50" y="{height - 2}" class="axis">{_num(x0)}</text>',
        f'<text x="{width - 60}" y="{height - 2}" class="axis">{_num(x1)}</text>',
    ]
    for i, (name, values) in enumerate(data.items()):
        path = " ".join(f"{50 + (x - x0) * sx:.1f},{height - 20 - (y - y0) * sy:.1f}" for x, y in values)
        colour = palette[i % len(palette)]
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}">'
            f"<title>{escape(name)}</title></polyline>"
        )
        parts.append(f'<text x="{width - 150}" y="{30 + 14 * i}" fill="{colour}" class="axis">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _num(value: float) -> str:
    return f"{value:.4g}"


def labels_for(values: Any) -> str:
    """A small helper for templates: a list joined by commas, escaped."""
    return escape(", ".join(map(str, values)))
