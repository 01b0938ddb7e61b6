"""`distml services`: the workspace's services as a table, from `serve.service.list_services`.

Names, URLs and pids never wrap (they are copied into other commands); only what the gateway
serves folds, and the table is as wide as it takes to show the rest whole.
"""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from distml.serve.service import GONE, ServiceStatus

_FOLDED_MIN_WIDTH = 12
_COLUMN_GAP = 3  # rich's padding and separator between two columns of a SIMPLE_HEAD table


def services_table(services: list[ServiceStatus]) -> tuple[Table, int]:
    """The services as a table, and the width to print it at (at least)."""
    rows = [
        (s.name, s.state, s.url, s.versions_label, s.replicas_label, str(s.pid), "red" if s.state == GONE else "")
        for s in services
    ]
    headers = ("service", "state", "url", "versions", "replicas", "pid")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    widths = []
    for k, header in enumerate(headers):
        if header == "versions":  # and their traffic split
            table.add_column(header, overflow="fold", min_width=_FOLDED_MIN_WIDTH)
            widths.append(_FOLDED_MIN_WIDTH)
            continue
        widths.append(max([len(header), *(len(row[k]) for row in rows)]))
        table.add_column(header, no_wrap=True, min_width=widths[-1])
    for *cells, style in rows:
        table.add_row(*(Text(cell, style=style if k == 1 else "") for k, cell in enumerate(cells)))  # no markup
    return table, sum(widths) + _COLUMN_GAP * (len(widths) - 1)
