"""Regenerate the README's performance section from ``benchmarks/results/latest.json``.

    .venv/bin/python -m benchmarks.readme_section [--results benchmarks/results/latest.json] [--readme README.md]
                                                  [--check]

Only the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is replaced (the markers stay); the
figures are never typed by hand. ``--check`` changes nothing and exits 1 when the section is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import (  # noqa: E402
    KEYS,
    LATEST,
    RESULTS_DIR,
    format_how,
    format_met,
    format_target,
    format_value,
    gpu_name,
    read_results,
)

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


class MarkerError(ValueError):
    """The README lacks the pair of bench markers (or has them twice, or in the wrong order)."""


def _load_range(before: list[float], after: list[float]) -> str:
    low, high = min(before[0], after[0]), max(before[0], after[0])
    return f"{low:.1f}" if round(low, 1) == round(high, 1) else f"{low:.1f}–{high:.1f}"


def render(payload: dict[str, Any], source: str = f"benchmarks/results/{LATEST}") -> str:
    """The markdown of the performance section: what was measured where, then one row per key."""
    hw = payload["hardware"]
    mode = "a quick run (bounded runs, small scales)" if payload["mode"] == "quick" else "a full run"
    partial = f" (groups {', '.join(payload.get('groups', []))} only)" if payload.get("partial") else ""
    lines = [
        f"Generated from `{source}` by `python -m benchmarks.readme_section`: {mode} of "
        f"`python -m benchmarks.run`{partial} at {payload['measured_at']} (commit "
        f"{payload.get('git_commit', 'unknown')}), {payload['wall_seconds']:.0f} s in all. Hardware: {hw['cpu']}, "
        f"{hw['cores']} cores, "
        f"{hw['torch_threads']} torch thread(s), GPU {gpu_name(hw)}, torch {hw['torch']}; load average "
        f"{_load_range(hw['loadavg_before'], hw['loadavg_after'])} during the run. Every ratio is measured in the "
        "same run as both of its sides; what each key measures: `benchmarks/README.md`.",
    ]
    if payload.get("errors"):
        lines.append("Failed in this run: " + "; ".join(f"{g} ({e.splitlines()[0]})" for g, e in payload["errors"].items()))
    lines += [
        "",
        "| key | what | value | target | met | how |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in payload["entries"].items():
        lines.append(f"| `{key}` | {KEYS[key].summary} | {format_value(entry)} | {format_target(entry)} | "
                     f"{format_met(entry)} | {format_how(entry).replace('|', '/')} |")
    return "\n".join(lines)


def replace_section(text: str, body: str) -> str:
    """TEXT with everything between the bench markers replaced by BODY (markers kept); MarkerError if the
    markers are missing, repeated or out of order."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != 1 or ends != 1:
        raise MarkerError(f"need exactly one {BEGIN} and one {END} (found {begins} and {ends}). Fix: put the two "
                          "marker lines where the performance section goes.")
    start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
    if stop < start:
        line = text.count("\n", 0, stop) + 1
        raise MarkerError(f"{END} (line {line}) comes before {BEGIN}. Fix: put {BEGIN} first.")
    return text[:start] + "\n" + body.strip("\n") + "\n" + text[stop:]


def update_readme(readme: Path, results: Path, check: bool = False) -> bool:
    """Rewrite README's bench section from RESULTS (atomically); returns whether it changed. With CHECK,
    only report whether it would."""
    from evaluate.results import write_text_atomic

    readme = Path(readme)
    try:
        text = readme.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{readme}: no such file. Fix: pass --readme path/to/README.md") from None
    try:
        new = replace_section(text, render(read_results(results)))
    except MarkerError as exc:
        raise MarkerError(f"{readme}: {exc}") from None
    if new != text and not check:
        write_text_atomic(new, readme)
    return new != text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / LATEST, help="results (default: %(default)s)")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md", help="README (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the section is out of date")
    args = parser.parse_args(argv)
    try:
        changed = update_readme(args.readme, args.results, check=args.check)
    except (OSError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    if args.check:
        if changed:
            raise SystemExit(f"{args.readme}: the performance section is out of date. Fix: run "
                             "`python -m benchmarks.readme_section`.")
        print(f"{args.readme}: the performance section matches {args.results}")
    else:
        print(f"{args.readme}: performance section {'updated' if changed else 'already up to date'} from "
              f"{args.results}")


if __name__ == "__main__":
    main()
