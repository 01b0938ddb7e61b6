"""A small user pipeline: fan out over words, fan in their lengths, and report only a long total.

Run it with `distml run examples/word_lengths.py:pipeline --param words='["data","ml"]'`.
The `measure` step is memoized: a second run with the same words hits the cache.
"""

from __future__ import annotations

from distml.workflow import Resources, current, step


def normalise(word: str) -> str:
    return word.strip().lower()


@step(memoize=True, resources=Resources(cpus=0.5))
def measure(word: str) -> dict:
    clean = normalise(word)
    current().log_metric("length", len(clean))
    return {"word": clean, "length": len(clean)}


@step
def total(measured: list) -> dict:
    return {"words": len(measured), "letters": sum(m["length"] for m in measured)}


@step(when=lambda summary, at_least: summary["letters"] >= at_least)
def report(summary: dict, at_least: int) -> str:
    return f"{summary['words']} words, {summary['letters']} letters"


def pipeline(words: list[str] = ["distributed", "machine", "learning"], at_least: int = 5):  # noqa: B006
    summary = total(measure.map(words))
    return {"summary": summary, "report": report(summary, at_least)}
