"""Regenerate the README's results table from evaluations (`evaluation.json` files).

    python docs/results.py "tiny, seed 0=outputs/kfp/<run>/evaluate-op/evaluation/evaluation.json" \
        ["tiny, seed 1=other/evaluation.json" ...] [--readme README.md]

Each argument is `label=path`: one row per evaluation, in the order given, with prompt
following, the attribute oracle's exact match (where rows carry synthetic scenes) with its
95 % bootstrap interval, and bits per token, on `validation` (where settings are chosen)
and `test` (reported). The table replaces what stands between the README's
`<!-- results:begin -->` and `<!-- results:end -->` markers; a metric an evaluation did
not compute shows as "–".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SPLITS = ("validation", "test")


def _percent(evaluation: dict, name: str) -> str:
    value = evaluation["metrics"].get(name)
    if value is None:
        return "–"
    interval = evaluation.get("intervals", {}).get(name)
    shown = f"{100 * value:.1f} %"
    return f"{shown} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else shown


def _number(evaluation: dict, name: str, digits: int) -> str:
    value = evaluation["metrics"].get(name)
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[tuple[str, dict]]) -> str:
    """The Markdown table of `(label, evaluation)` rows."""
    header = ["run"]
    for split in SPLITS:
        header += [f"prompt following, {split}", f"exact, {split}"]
    header.append("bits/token, " + " / ".join(SPLITS))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, evaluation in rows:
        cells = [label]
        for split in SPLITS:
            cells.append(_number(evaluation, f"{split}/prompt_following", 3))
            cells.append(_percent(evaluation, f"{split}/exact"))
        bits = [_number(evaluation, f"{split}/bits_per_token", 3) for split in SPLITS]
        cells.append(" / ".join(bits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with the lines between the markers replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"the README must hold {BEGIN} then {END}, once each")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="+", metavar="LABEL=EVALUATION_JSON")
    parser.add_argument("--readme", type=Path, default=Path(__file__).parents[1] / "README.md")
    args = parser.parse_args(argv)
    rows = []
    for item in args.rows:
        label, sep, path = item.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"{item!r}: give LABEL=path/to/evaluation.json")
        try:
            evaluation = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SystemExit(f"{path}: not a readable evaluation.json ({err})") from None
        if not isinstance(evaluation, dict) or "metrics" not in evaluation:
            raise SystemExit(f"{path}: no `metrics`: give the evaluate step's evaluation.json")
        rows.append((label.strip(), evaluation))
    readme = args.readme.read_text(encoding="utf-8")
    args.readme.write_text(replace_block(readme, table(rows)), encoding="utf-8")
    print(f"wrote {len(rows)} rows into {args.readme}")


if __name__ == "__main__":
    main()
