"""`make bench`: run every benchmark, then print one table of each ratio and target figure.

Each `benchmarks/*.py` prints one JSON object as its last line ({"benchmark", "results", "ratios",
"targets", "targets_met"}); this runs them one after another (`--quick` unless BENCH_FLAGS says
otherwise; BENCH_ONLY="workflow serving" runs those alone), keeps those lines in benchmarks/out/,
and lays out every target (met or missed) and every ratio. Exits 1 when a benchmark failed to give
its result; a missed target is a row of the table (`python benchmarks/X.py --check`, or
BENCH_STRICT=1 here, makes it an error).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: Path, flags: list[str]) -> dict | None:
    print(f"== {script.name} {' '.join(flags)}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, str(script), *flags], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"{script.name}: no JSON line (exit {done.returncode})", file=sys.stderr)
        return None
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{script.stem}.json").write_text(lines[-1] + "\n")
    return report


def lookup(report: dict, name: str) -> float | None:
    for part in ("ratios", "results"):
        value = report.get(part, {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, verdict) for every target, then every ratio without one."""
    out = []
    targets = report.get("targets", {})
    met = report.get("targets_met", {})
    for name, target in targets.items():
        value = lookup(report, name)
        if isinstance(target, dict):
            bound = " ".join(f"{'>=' if k == 'min' else '<='} {v:g}" for k, v in target.items())
        else:
            bound = f">= {target:g}"
        verdict = {True: "met", False: "MISSED"}.get(met.get(name), "not measured" if value is None else "?")
        out.append((name, "-" if value is None else f"{value:.4g}", bound, verdict))
    for name, value in report.get("ratios", {}).items():
        if name not in targets and isinstance(value, (int, float)):
            out.append((name, f"{value:.4g}", "", ""))
    return out


def main() -> int:
    flags = shlex.split(os.environ.get("BENCH_FLAGS", "--quick"))
    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    only = os.environ.get("BENCH_ONLY", "").split()  # e.g. BENCH_ONLY="workflow serving": those alone
    unknown = sorted(set(only) - {s.stem for s in scripts})
    if unknown:
        names = ", ".join(s.stem for s in scripts)
        print(f"BENCH_ONLY: no benchmark named {', '.join(unknown)}; the benchmarks are {names}", file=sys.stderr)
        return 2
    scripts = [s for s in scripts if not only or s.stem in only]
    table: list[tuple[str, str, str, str, str]] = []
    failed = []
    for script in scripts:
        report = run(script, flags)
        if report is None:
            failed.append(script.stem)
            table.append((script.stem, "(failed: no result)", "", "", "MISSED"))
            continue
        for figure in rows(report):
            table.append((script.stem, *figure))
        for skipped in report.get("results", {}).get("skipped", []) or []:
            table.append((script.stem, f"(skipped: {skipped})", "", "", ""))
    widths = [max(len(r[i]) for r in [("benchmark", "figure", "value", "target", "")] + table) for i in range(5)]
    header = ("benchmark", "figure", "value", "target", "")
    for r in [header] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    missed = [r for r in table if r[4] == "MISSED"]
    print(f"\n{len(table)} figures, {len(missed)} missed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or (missed and os.environ.get("BENCH_STRICT") == "1") else 0


if __name__ == "__main__":
    sys.exit(main())
