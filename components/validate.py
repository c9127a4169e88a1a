"""Validate: a Great Expectations suite over the per-row facts that ingest gathered.

Consecutive canonical shards, up to `BATCH_ROWS` rows, form one GE batch (the same
suite per batch, so batches can be validated in parallel on a cluster). Rows failing
any expectation go to the quarantine with every reason that applies; the rest are
written as accepted shards. `accepted + quarantined == input rows` always. Past
`data.max_quarantine_fraction`, or when the split balance is off, the step stops with
a message naming the top reasons and the report, after writing them.

Split balance: `train` must hold accepted rows, and each split's share must lie within
[`data.min_split_fraction`, `data.max_split_fraction`]. Where ingest split the whole set
by content hash, `validation` and `test` must hold rows too, and the bounds widen to the
hash's sampling noise around the fractions it drew with.

The accepted folder has the canonical layout (components/shards.py), one file per split
and shard, so it opens as it is:

    datasets.load_dataset("parquet", data_dir=folder)  # a DatasetDict by split; PIL images
    pandas.read_parquet(folder / "data")               # all splits; the `split` column says which
"""

import html
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from parti_ops.components.progress import track
from parti_ops.components.shards import (
    FACT_COLUMNS,
    ShardWriter,
    control_chars,
    describe_chars,
    read_manifest,
    read_shard,
    write_json,
)
from parti_ops.model.config import Config, DataConfig
from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)

# Pillow modes a source image may open as; ingest converts these to RGB.
KNOWN_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
               "LAB", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]  # fmt: skip


# Rows per Great Expectations batch: consecutive shards are validated together, since a
# checkpoint run has a fixed cost (~0.3 s) and the facts are small (no image bytes).
BATCH_ROWS = 50_000

# A hash-split share may stray this many binomial standard deviations from its fraction:
# the chance that a uniform hash strays further is under 3e-7 (normal tail), so a set
# that fails is off for a reason, not by luck.
SPLIT_NOISE_SIGMAS = 5.0
# The chance of an empty held-out split that the suggested fraction keeps under.
EMPTY_SPLIT_ODDS = 1e-3


class DataValidationError(PartiError, RuntimeError):
    """Validation stopped the run; the message says why and where the report is."""


@dataclass(frozen=True)
class RowCheck:
    """One row-level expectation, the quarantine reason it gives and how to word its detail."""

    reason: str
    expectation: Callable[[DataConfig, float], Any]
    detail: Callable[[dict[str, Any], DataConfig], str]


def _checks() -> list[RowCheck]:
    import great_expectations as gx

    E = gx.expectations
    # Order matters: a later check whose detail repeats an earlier one is not listed twice.
    return [
        RowCheck(
            "path_outside_root",
            lambda d, m: E.ExpectColumnValuesToBeInSet(
                column="path_inside_root", value_set=[True], mostly=m
            ),
            lambda r, d: r["read_error"],
        ),
        RowCheck(
            "unreadable",
            lambda d, m: E.ExpectColumnValuesToBeNull(column="read_error", mostly=m),
            lambda r, d: r["read_error"],
        ),
        RowCheck(
            "not_decodable",
            lambda d, m: E.ExpectColumnValuesToBeInSet(
                column="decodable", value_set=[True], mostly=m
            ),
            lambda r, d: r["decode_error"],
        ),
        RowCheck(
            "unknown_mode",
            lambda d, m: E.ExpectColumnValuesToBeInSet(
                column="mode", value_set=KNOWN_MODES, mostly=m
            ),
            lambda r, d: f"image mode {r['mode']!r} is not one ingest can convert",
        ),
        RowCheck(
            "width_out_of_range",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="width", min_value=d.min_image_side, max_value=d.max_image_side, mostly=m
            ),
            lambda r, d: f"width {r['width']} outside [{d.min_image_side}, {d.max_image_side}]",
        ),
        RowCheck(
            "height_out_of_range",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="height", min_value=d.min_image_side, max_value=d.max_image_side, mostly=m
            ),
            lambda r, d: f"height {r['height']} outside [{d.min_image_side}, {d.max_image_side}]",
        ),
        RowCheck(
            "aspect_ratio",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="aspect_ratio", min_value=1.0, max_value=d.max_aspect_ratio, mostly=m
            ),
            lambda r, d: f"aspect ratio {r['aspect_ratio']:.2f} over {d.max_aspect_ratio}",
        ),
        RowCheck(
            "caption_not_utf8",
            lambda d, m: E.ExpectColumnValuesToBeInSet(
                column="caption_utf8", value_set=[True], mostly=m
            ),
            lambda r, d: "caption is not valid UTF-8",
        ),
        RowCheck(
            "caption_control_chars",
            lambda d, m: E.ExpectColumnValuesToBeInSet(
                column="caption_control_chars", value_set=[False], mostly=m
            ),
            lambda r, d: (
                "caption contains invisible control or format characters: "
                + describe_chars(control_chars(r["caption"] or ""))
            ),
        ),
        RowCheck(
            "caption_empty",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="caption_chars", min_value=1, mostly=m
            ),
            lambda r, d: "caption is empty or only whitespace",
        ),
        RowCheck(
            "caption_too_long",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="caption_chars", max_value=d.max_caption_chars, mostly=m
            ),
            lambda r, d: f"caption has {r['caption_chars']} characters (max {d.max_caption_chars})",
        ),
        RowCheck(
            "caption_too_many_words",
            lambda d, m: E.ExpectColumnValuesToBeBetween(
                column="caption_words", max_value=d.max_caption_words, mostly=m
            ),
            lambda r, d: f"caption has {r['caption_words']} words (max {d.max_caption_words})",
        ),
        RowCheck(
            "duplicate_image",
            lambda d, m: E.ExpectColumnValuesToBeNull(column="duplicate_of", mostly=m),
            lambda r, d: f"same image bytes as row {r['duplicate_of']}",
        ),
    ]


class _Suites:
    """An in-memory GE context with the row suite, the split suite and a Data Docs site."""

    def __init__(self, docs_dir: Path, data: DataConfig):
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        site = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,  # no usage statistics leave this machine
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites={"data_docs": site},
        )
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        source = self.context.data_sources.add_pandas("facts")
        self.checks = _checks()
        mostly = 1.0 - data.max_quarantine_fraction
        self.rows = self._checkpoint(
            gx,
            source.add_dataframe_asset("rows").add_batch_definition_whole_dataframe("shard"),
            "image_caption_rows",
            [self._tagged(c, data, mostly) for c in self.checks],
            {"result_format": "COMPLETE", "unexpected_index_column_names": ["row_id"]},
        )
        E = gx.expectations
        self.splits = self._checkpoint(
            gx,
            source.add_dataframe_asset("splits").add_batch_definition_whole_dataframe("all"),
            "image_caption_splits",
            [
                # Parameters: what a split must hold depends on how ingest split the set.
                E.ExpectColumnDistinctValuesToContainSet(
                    column="split", value_set={"$PARAMETER": "required_splits"}
                ),
                E.ExpectColumnValuesToBeBetween(
                    column="fraction",
                    min_value={"$PARAMETER": "min_fraction"},
                    max_value={"$PARAMETER": "max_fraction"},
                ),
            ],
            {"result_format": "COMPLETE"},
        )

    @staticmethod
    def _tagged(check: RowCheck, data: DataConfig, mostly: float):
        expectation = check.expectation(data, mostly)
        expectation.meta = {"reason": check.reason}  # read back from each result
        return expectation

    def _checkpoint(self, gx, batch, name, expectations, result_format):
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = gx.Checkpoint(
            name=name, validation_definitions=[definition], result_format=result_format
        )
        return self.context.checkpoints.add(checkpoint)

    @staticmethod
    def run(checkpoint, frame: pd.DataFrame, run_name: str, parameters: dict | None = None):
        from great_expectations.core.run_identifier import RunIdentifier

        result = checkpoint.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            run_id=RunIdentifier(run_name=run_name),
        )
        (validation,) = result.run_results.values()
        return result.success, validation.results


def validate(canonical_dir: str | Path, out_dir: str | Path, data: DataConfig) -> dict[str, Any]:
    """Run the suite over every shard, write accepted shards, quarantine, Data Docs and report.

    Writes into `out_dir`: `accepted/` (shards + manifest), `quarantine.jsonl`,
    `data_docs/index.html`, `report.json` and `report.html`.

    Raises:
        DataValidationError: after writing everything, when the quarantine fraction is over
            `data.max_quarantine_fraction` or the split balance expectations fail.
    """
    canonical_dir, out = Path(canonical_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(canonical_dir)
    suites = _Suites(out / "data_docs", data)
    accepted = ShardWriter(out / "accepted", shard_size=data.shard_size)
    reasons: Counter[str] = Counter()
    splits: Counter[str] = Counter()
    rows_in = quarantined = 0
    unexpected: Counter[str] = Counter()  # per expectation, summed over batches
    counted: Counter[str] = Counter()
    batches = _batches(manifest["shards"], BATCH_ROWS)
    with open(out / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for index, batch in enumerate(track(batches, "validate", len(batches))):
            facts = pd.concat(
                [read_shard(canonical_dir, s, FACT_COLUMNS).to_pandas() for s in batch],
                ignore_index=True,
            )
            _, results = suites.run(suites.rows, facts, f"batch-{index:05d}")
            for r in results:
                reason = r.expectation_config.meta["reason"]
                unexpected[reason] += r.result.get("unexpected_count") or 0
                counted[reason] += r.result["element_count"] - (r.result.get("missing_count") or 0)
            flagged = _flagged_rows(results, suites.checks)
            bad_ids = pa.array(list(flagged), pa.int64())
            for shard in batch:
                table = read_shard(canonical_dir, shard)
                is_bad = pc.is_in(table["row_id"], value_set=bad_ids)
                accepted.write_table(table.filter(pc.invert(is_bad)))
                for row in table.filter(is_bad).drop_columns(["image"]).to_pylist():
                    row_reasons = _reasons(row, flagged[row["row_id"]], data)
                    reasons.update(r.split(":", 1)[0] for r in row_reasons)
                    quarantine.write(json.dumps({**row, "reasons": row_reasons}) + "\n")
            rows_in += len(facts)
            quarantined += len(flagged)
            splits.update(facts.loc[~facts["row_id"].isin(flagged), "split"])
    n_accepted = rows_in - quarantined
    split_frame = pd.DataFrame(
        {"split": list(splits), "fraction": [n / max(n_accepted, 1) for n in splits.values()]}
    )
    rule = split_rule(manifest, n_accepted, data)
    splits_ok, split_results = suites.run(
        suites.splits,
        split_frame,
        "splits",
        {
            "required_splits": rule["required"],
            "min_fraction": rule["min_fraction"],
            "max_fraction": rule["max_fraction"],
        },
    )
    split_failures = split_problems(splits, rule, manifest)
    if not splits_ok and not split_failures:  # cannot happen; never hide GE's verdict
        split_failures = [_describe(r) for r in split_results if not r.success]
    suites.context.build_data_docs()
    accepted.close(
        source=str(canonical_dir.resolve()),
        data_digest=manifest.get("data_digest"),
        image_size=manifest.get("image_size"),
        splits=dict(sorted(splits.items())),
    )
    fraction = quarantined / rows_in if rows_in else 0.0
    failed_expectations = {
        reason
        for reason, n in unexpected.items()
        if counted[reason] and n / counted[reason] > data.max_quarantine_fraction
    }
    report = {
        "rows_in": rows_in,
        "accepted": n_accepted,
        "quarantined": quarantined,
        "quarantine_fraction": fraction,
        "max_quarantine_fraction": data.max_quarantine_fraction,
        "reasons": dict(reasons.most_common()),
        "failed_expectations": sorted(failed_expectations),
        "splits": dict(sorted(splits.items())),
        "split_balance_ok": splits_ok,
        "split_balance_failures": split_failures,
        "split_rule": rule,
        "data_digest": manifest.get("data_digest"),
        "paths": {
            "accepted": str((out / "accepted").resolve()),
            "quarantine": str((out / "quarantine.jsonl").resolve()),
            "data_docs": str((out / "data_docs" / "index.html").resolve()),
            "report": str((out / "report.html").resolve()),
        },
    }
    # Each expectation allows `mostly` failures over the whole data set (batches are only
    # how it is read), and so does the union: the fraction quarantined for any reason.
    report["checkpoints_ok"] = not failed_expectations
    within = fraction <= data.max_quarantine_fraction
    report["passed"] = report["checkpoints_ok"] and splits_ok and within
    write_json(out / "report.json", report)
    page = render_html(report, out / "quarantine.jsonl")
    (out / "report.html").write_text(page, encoding="utf-8")
    if n_accepted + quarantined != rows_in:  # cannot happen; never let it pass silently
        raise RuntimeError(f"row count mismatch: {n_accepted} + {quarantined} != {rows_in}")
    log.info(
        "validated %d rows: %d accepted, %d quarantined (%.1f%%); report: %s",
        rows_in, n_accepted, quarantined, 100 * fraction, report["paths"]["report"],
    )  # fmt: skip
    if not report["passed"]:
        raise DataValidationError(failure_message(report))
    return report


def split_rule(manifest: dict[str, Any], accepted: int, data: DataConfig) -> dict[str, Any]:
    """The splits that must hold rows and the bounds on each split's share of `accepted`."""
    lo, hi = data.min_split_fraction, data.max_split_fraction
    hashed = manifest.get("hash_split")
    if not hashed or sum(hashed["rows"].values()) != manifest["rows"]:
        # Splits the data set chose itself (or a mix): they are taken as meant.
        return {"required": ["train"], "min_fraction": lo, "max_fraction": hi, "hashed": False}
    # Each split's count is binomial(n, p): its share strays from p by sqrt(p(1-p)/n).
    n = max(accepted, 1)
    fractions = {s: p for s, p in hashed["fractions"].items() if p > 0}
    for p in fractions.values():
        noise = SPLIT_NOISE_SIGMAS * math.sqrt(p * (1 - p) / n)
        lo, hi = min(lo, p - noise), max(hi, p + noise)
    return {
        "required": list(fractions),
        "min_fraction": max(lo, 0.0),
        "max_fraction": min(hi, 1.0),
        "hashed": True,
    }


def split_problems(
    splits: Counter[str], rule: dict[str, Any], manifest: dict[str, Any]
) -> list[str]:
    """What is wrong with the accepted rows' splits, each naming the split and the setting."""
    n = sum(splits.values())
    problems = [_missing(split, rule, manifest) for split in rule["required"] if not splits[split]]
    for split, count in sorted(splits.items()):
        share = count / n
        if share < rule["min_fraction"]:
            problems.append(
                f"split {split!r} holds {count} of {n} accepted rows ({share:.1%}), under"
                f" {rule['min_fraction']:.1%}: add rows to it or lower data.min_split_fraction"
            )
        elif share > rule["max_fraction"]:
            problems.append(
                f"split {split!r} holds {count} of {n} accepted rows ({share:.1%}), over"
                f" {rule['max_fraction']:.1%}: add held-out rows or raise"
                " data.max_split_fraction"
            )
    return problems


def _missing(split: str, rule: dict[str, Any], manifest: dict[str, Any]) -> str:
    if not rule["hashed"]:
        return (
            f"split {split!r} has no accepted rows; give rows a 'split' of train, validation"
            " or test, or none at all to split them by content hash"
        )
    drawn, rows = manifest["hash_split"]["rows"].get(split, 0), manifest["rows"]
    if not rows:
        return "the data set has no rows at all; check the source's metadata file"
    if drawn:
        return (
            f"split {split!r} has no accepted rows: all {drawn} rows the content hash drew"
            " for it were quarantined (see the quarantine)"
        )
    if split == "train":
        return f"split 'train' has no rows: the content hash drew none of {rows} for it"
    # The fraction p at which drawing none of `rows` has odds (1 - p)^rows = EMPTY_SPLIT_ODDS.
    fraction = manifest["hash_split"]["fractions"][split]
    needed = math.ceil((1 - EMPTY_SPLIT_ODDS ** (1 / rows)) * 100) / 100
    needed = min(max(needed, fraction + 0.01), 0.45)
    setting = f"data.{split}_fraction"
    return (
        f"split {split!r} has no rows: the content hash drew none of {rows} rows for it"
        f" ({setting}={fraction:g}); on a set this small"
        f" raise it (--set {setting}={needed:g}) or give each row its own 'split'"
    )


def _batches(shards: list[dict[str, Any]], max_rows: int) -> list[list[dict[str, Any]]]:
    """Consecutive shards grouped up to `max_rows` rows (a bigger shard is a batch alone)."""
    batches: list[list[dict[str, Any]]] = []
    rows = max_rows
    for shard in shards:
        if rows + shard["rows"] > max_rows:
            batches.append([])
            rows = 0
        batches[-1].append(shard)
        rows += shard["rows"]
    return batches


def _flagged_rows(results, checks: list[RowCheck]) -> dict[int, list[RowCheck]]:
    """{row_id: [checks it failed, in suite order]} from a checkpoint's COMPLETE results."""
    by_reason = {c.reason: c for c in checks}
    order = {c.reason: i for i, c in enumerate(checks)}
    flagged: dict[int, list[RowCheck]] = {}
    for result in results:
        check = by_reason[result.expectation_config.meta["reason"]]
        for hit in result.result.get("unexpected_index_list") or []:
            flagged.setdefault(int(hit["row_id"]), []).append(check)
    return {k: sorted(v, key=lambda c: order[c.reason]) for k, v in flagged.items()}


def _reasons(row: dict[str, Any], failed: list[RowCheck], data: DataConfig) -> list[str]:
    """ "reason: detail" for each failed check, skipping a detail an earlier reason already gave."""
    out, seen = [], set()
    for check in failed:
        detail = check.detail(row, data)
        if detail not in seen:
            seen.add(detail)
            out.append(f"{check.reason}: {detail}")
    return out


def _describe(result) -> str:
    config = result.expectation_config
    observed = result.result.get("partial_unexpected_list") or result.result.get("observed_value")
    return f"{config.type} {config.kwargs.get('column')}: unexpected {observed}"


def failure_message(report: dict[str, Any]) -> str:
    parts = []
    if report["quarantine_fraction"] > report["max_quarantine_fraction"]:
        top = ", ".join(f"{k} ({v})" for k, v in list(report["reasons"].items())[:3])
        parts.append(
            f"{report['quarantined']} of {report['rows_in']} rows quarantined "
            f"({100 * report['quarantine_fraction']:.1f}% > data.max_quarantine_fraction="
            f"{100 * report['max_quarantine_fraction']:.1f}%); top reasons: {top}"
        )
    elif not report["checkpoints_ok"]:
        parts.append(
            "Great Expectations failed "
            f"{', '.join(report['failed_expectations'])} (over "
            f"{100 * report['max_quarantine_fraction']:.1f}% of the rows)"
        )
    if not report["split_balance_ok"]:
        parts.append(f"split balance failed: {'; '.join(report['split_balance_failures'])}")
    return f"validation stopped the run: {'; '.join(parts)}. Report: {report['paths']['report']}"


def render_html(report: dict[str, Any], quarantine: Path, limit: int = 200) -> str:
    """A one-page summary: counts, reasons, splits, first quarantined rows, link to Data Docs."""
    esc = html.escape

    def table(counts: dict[str, int]) -> str:
        return "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in counts.items())

    reasons, splits = table(report["reasons"]), table(report["splits"])
    rows = []
    with open(quarantine, encoding="utf-8") as f:
        for _, line in zip(range(limit), f, strict=False):
            row = json.loads(line)
            rows.append(
                f"<tr><td>{row['row_id']}</td><td>{esc(row['source'])}</td>"
                f"<td>{esc('; '.join(row['reasons']))}</td></tr>"
            )
    status = "passed" if report["passed"] else "FAILED"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>parti-ops data validation: {status}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse;margin-bottom:1.5em}}</style></head><body>
<h1>Data validation {status}</h1>
<p>{report["rows_in"]} rows in, {report["accepted"]} accepted, {report["quarantined"]} quarantined
({100 * report["quarantine_fraction"]:.2f}%, limit {100 * report["max_quarantine_fraction"]:.2f}%).
Data digest: <code>{esc(str(report["data_digest"]))}</code>.
Great Expectations Data Docs: <a href="data_docs/index.html">data_docs/index.html</a>.</p>
<h2>Quarantine reasons</h2><table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<h2>Accepted rows per split</h2><table><tr><th>split</th><th>rows</th></tr>{splits}</table>
<h2>Quarantined rows (first {limit})</h2>
<table><tr><th>row</th><th>source</th><th>reasons</th></tr>{"".join(rows)}</table>
</body></html>
"""


def validate_step(
    config: Config, parent_run_id: str, canonical_dir: str, out_dir: str
) -> dict[str, Any]:
    """`validate` inside a nested MLflow run; logs counts, reasons, report and Data Docs.

    The run is logged before a failing gate raises, so the report is there to read.
    """
    from parti_ops.components.tracking import step_run

    out = Path(out_dir)
    with step_run(config, "validate", parent_run_id) as run:
        try:
            report = validate(canonical_dir, out, config.data)
        except DataValidationError:
            _log_report(run, json.loads((out / "report.json").read_text(encoding="utf-8")), out)
            raise
        _log_report(run, report, out)
    return report


def _log_report(run, report: dict[str, Any], out: Path) -> None:
    run.log(
        metrics={
            "rows_in": report["rows_in"],
            "accepted": report["accepted"],
            "quarantined": report["quarantined"],
            "quarantine_fraction": report["quarantine_fraction"],
            **{f"quarantined.{k}": v for k, v in report["reasons"].items()},
            **{f"accepted.{k}": v for k, v in report["splits"].items()},
        },
        tags={"validation.passed": report["passed"], "data.digest": report["data_digest"]},
    )
    for name in ("report.json", "report.html", "quarantine.jsonl"):
        run.log_artifact(out / name, "validation")
    run.log_artifacts(out / "data_docs", "validation/data_docs")
