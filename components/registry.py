"""The MLflow model registry as the pipeline uses it: versions, aliases, the promotion gate.

The register step (components/register.py) logs each trained bundle as a version with
lineage tags and its evaluation; the export step downloads the champion; `parti registry`
shows, promotes and rolls back. Aliases:

- `challenger`: the newest registered version;
- `champion`: the version to serve; the gate moves it, or `parti registry promote`;
- `previous-champion`: the champion it replaced, what `parti registry rollback` restores.

The promotion gate (`decide`) compares a challenger with the champion only on the
same held-out data and evaluator (the evaluation's `key`); on another key the champion
is re-scored first, or the promotion is refused.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parti_ops.components.stats import paired_difference
from parti_ops.model.config import Config, RegistryConfig
from parti_ops.model.errors import PartiError

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
EVALUATION = "evaluation.json"
DECISION_JSON, DECISION_MD = "decision.json", "decision.md"
# The gate's metrics: all of `validation`, where settings and promotions are chosen.
FOLLOWING = "validation/prompt_following"
BITS = "validation/bits_per_token"
EXACT = "validation/exact"  # the attribute oracle's; only where rows carry scenes
FID, CLIP = "fid", "clip_score"
REQUIRED_METRICS = (BITS,)  # the rest may be absent: their rules say "not applied"
STATUS_METRICS = (FOLLOWING, BITS, EXACT, FID, CLIP)  # `parti registry status` shows these
KEY_FIELDS = ("data_digest", "evaluator")
# Version tags: `metric.<name>` for each metric, `eval.<field>` for the evaluation key.
METRIC_TAG, KEY_TAG = "metric.", "eval."
IMAGE_TOKENIZER_TAG = "image_tokenizer.digest"  # a version's, as `bundle_lineage` tags it
REPLACED_TAG = "champion.replaced"  # on a champion: the version it replaced
BUNDLE_TAG = "registration.digest"  # a version's bundle and evaluation (`registration_digest`)
UNCHANGED = "unchanged"
MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value
EVALUATION_ARTIFACT = f"evaluation/{EVALUATION}"  # in the register run: per-prompt values
PASS, FAIL, NOT_APPLIED = "pass", "fail", "not applied"


class RegistryError(PartiError, ValueError):
    """A registry action that cannot be done; the message says why and what to do."""


def load_evaluation(evaluation_dir: str | Path) -> dict[str, Any]:
    """`<evaluation_dir>/evaluation.json`, checked: `{"metrics": {...}, "key": {...}}`.

    Raises:
        RegistryError: naming the file and the missing or malformed field.
    """
    path = Path(evaluation_dir) / EVALUATION
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RegistryError(
            f"{path}: no readable evaluation ({err}); run the evaluation first"
        ) from None
    return check_evaluation(body, str(path))


def check_evaluation(body: Any, source: str) -> dict[str, Any]:
    """The evaluation `body` with float metrics, or RegistryError naming `source` and the field.

    A metric may be null or absent (not measured, e.g. the oracle's on data without
    scenes); `validation/bits_per_token` must be a number. `intervals`, `per_prompt` and
    `not_computed` are optional (older evaluations have none).
    """
    if not isinstance(body, dict):
        raise RegistryError(f"{source}: expected an object with 'metrics' and 'key'")
    for field_name in ("metrics", "key"):
        if not isinstance(body.get(field_name), dict):
            raise RegistryError(f"{source}: missing field {field_name!r} (an object)")
    metrics: dict[str, float | None] = {}
    for name, value in body["metrics"].items():
        if value is not None and not _number(value):
            raise RegistryError(f"{source}: metrics.{name}={value!r} is not a number")
        metrics[name] = None if value is None else float(value)
    for name in REQUIRED_METRICS:
        if metrics.get(name) is None:
            raise RegistryError(
                f"{source}: missing field metrics.{name} (a number); the gate needs a"
                " validation split (data.validation_fraction)"
            )
    key = body["key"]
    for name in KEY_FIELDS:
        if not isinstance(key.get(name), str) or not key[name]:
            raise RegistryError(f"{source}: missing field key.{name} (a string)")
    intervals = {}
    for name, span in (body.get("intervals") or {}).items():
        if not (isinstance(span, list) and len(span) == 2 and all(map(_number, span))):
            raise RegistryError(f"{source}: intervals.{name}={span!r} is not [low, high]")
        intervals[name] = (float(span[0]), float(span[1]))
    per_prompt = {}
    for name, values in (body.get("per_prompt") or {}).items():
        if not (isinstance(values, list) and all(map(_number, values))):
            raise RegistryError(f"{source}: per_prompt.{name} is not a list of numbers")
        per_prompt[name] = [float(v) for v in values]
    # The evaluator digest already covers the feature model; it is kept apart for lineage.
    return {
        **body,
        "metrics": metrics,
        "key": {k: str(key[k]) for k in KEY_FIELDS},
        "feature_model": str(key.get("feature_model", "")),
        "intervals": intervals,
        "per_prompt": per_prompt,
        "not_computed": {str(k): str(v) for k, v in (body.get("not_computed") or {}).items()},
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """One check of the gate on one metric: `judged <op> limit`.

    A floor judges the challenger's interval at its cautious end (the low end for a
    minimum); a rule against the champion judges the interval of the paired difference,
    failing only when all of it lies beyond the margin.
    """

    name: str  # the setting in `registry` that sets the limit
    metric: str
    value: float | None  # the challenger's
    op: str  # ">=" or "<="
    limit: float | None
    champion: float | None = None  # the champion's value, for rules against it
    interval: tuple[float, float] | None = None  # challenger's, or of the difference
    status: str = PASS  # pass | fail | not applied
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    def describe(self) -> str:
        span = "" if self.interval is None else f", interval {_span(self.interval)}"
        judged = "difference" if self.champion is not None else self.metric
        return (
            f"{self.name} ({self.metric} {_cell(self.value)}{span}: {judged} not"
            f" {self.op} {_cell(self.limit)})"
        )


def _span(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def _absent(name: str, metric: str, op: str, evaluation: dict, whose: str = "") -> Rule:
    why = evaluation.get("not_computed", {}).get(metric, "not in the evaluation")
    note = f"{whose}{metric} not measured ({why})"
    return Rule(name, metric, None, op, None, status=NOT_APPLIED, note=note)


def floor_rule(name: str, metric: str, evaluation: dict, op: str, limit: float) -> Rule:
    """The challenger's `metric` against a fixed limit, by its interval where it has one."""
    value = evaluation["metrics"].get(metric)
    if value is None:
        return _absent(name, metric, op, evaluation)
    interval = evaluation.get("intervals", {}).get(metric)
    judged = value if interval is None else (interval[0] if op == ">=" else interval[1])
    # NaN fails both comparisons: a diverged model never passes.
    passed = judged >= limit if op == ">=" else judged <= limit
    end = "low" if op == ">=" else "high"
    note = "" if interval is None else f"judged by the interval's {end} end"
    return Rule(name, metric, value, op, limit, interval=interval,
                status=PASS if passed else FAIL, note=note)  # fmt: skip


def versus_rule(
    name: str, metric: str, challenger: dict, champion: dict, op: str, margin: float
) -> Rule:
    """Challenger minus champion on `metric` may not lie beyond `margin` (worse by more).

    `op` ">=": higher is better, the difference must reach `-margin`; "<=": lower is
    better, it must stay under `margin`. With both evaluations' per-prompt values (the same
    prompts, as their keys match) the whole paired bootstrap interval must be beyond the
    margin to fail; without them the point values are compared, and the note says so.
    """
    new, old = challenger["metrics"].get(metric), champion["metrics"].get(metric)
    if new is None:
        return _absent(name, metric, op, challenger, "challenger's ")
    if old is None or math.isnan(old):
        return _absent(name, metric, op, champion, "champion's ")
    limit = -margin if op == ">=" else margin
    pairs = challenger.get("per_prompt", {}).get(metric), champion.get("per_prompt", {}).get(metric)
    if all(pairs) and len(pairs[0]) == len(pairs[1]):
        diff, interval = paired_difference(*pairs)
        beyond = interval[1] < limit if op == ">=" else interval[0] > limit
        note = f"paired difference {diff:+.4g} over {len(pairs[0])} prompts"
    else:
        diff, interval = new - old, None
        beyond = not (diff >= limit if op == ">=" else diff <= limit)  # NaN: beyond
        note = "no per-prompt values for both: point values compared"
    return Rule(name, metric, new, op, limit, champion=old, interval=interval,
                status=FAIL if beyond else PASS, note=note)  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """What the gate decided: `promote`, `reject` (a rule failed), `refuse` (no comparison)
    or `unchanged` (the challenger is the champion's own weights: nothing to decide)."""

    outcome: str
    reason: str
    rules: tuple[Rule, ...] = ()

    @property
    def promoted(self) -> bool:
        return self.outcome == "promote"

    @property
    def failed_rules(self) -> list[str]:
        return [rule.name for rule in self.rules if not rule.passed]

    @property
    def not_applied(self) -> list[str]:
        return [rule.name for rule in self.rules if rule.status == NOT_APPLIED]

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "promoted": self.promoted,
            "reason": self.reason,
            "failed_rules": self.failed_rules,
            "not_applied": self.not_applied,
            "rules": [asdict(rule) for rule in self.rules],
        }


def decide(challenger: dict, champion: dict | None, rules: RegistryConfig) -> Decision:
    """The promotion gate: may `challenger` replace `champion` (None: there is none yet)?

    Both are evaluations as `check_evaluation` returns them. The floors always apply:
    prompt following (`min_prompt_following`, by its interval's low end), bits per token
    (`max_bits_per_token`) and, where rows carry scenes, the oracle's exact accuracy
    (`min_fidelity`). Against a champion the challenger may also lose at most
    `max_prompt_following_drop`, `max_fidelity_drop` and `max_nll_rise` (absolute, by
    the paired interval) and its FID may be at most `max_fid_rise` (relative) above the
    champion's. Metrics are compared only when both evaluations have the same `key` (held-out
    data and evaluator); otherwise the decision is `refuse`. Bits per token count codes, so
    they are not compared when the two bundles' image tokenizers differ.
    """
    checks = [
        floor_rule("min_prompt_following", FOLLOWING, challenger, ">=", rules.min_prompt_following),
        floor_rule("max_bits_per_token", BITS, challenger, "<=", rules.max_bits_per_token),
        floor_rule("min_fidelity", EXACT, challenger, ">=", rules.min_fidelity),
    ]
    if champion is None:
        return _outcome(tuple(checks), "first model")
    if champion["key"] != challenger["key"]:
        differ = "; ".join(
            f"{k}: champion {champion['key'].get(k)!r}, challenger {challenger['key'].get(k)!r}"
            for k in sorted(set(champion["key"]) | set(challenger["key"]))
            if champion["key"].get(k) != challenger["key"].get(k)
        )
        return Decision(
            "refuse",
            f"refused: champion evaluated on other data/evaluator ({differ}); re-evaluate the"
            " champion on the challenger's held-out data to compare",
            tuple(checks),
        )
    old = champion["metrics"].get(FID)
    fid_limit = None if old is None else old * (1 + rules.max_fid_rise)
    new_fid = challenger["metrics"].get(FID)
    if new_fid is None or fid_limit is None:
        fid_rule = _absent("max_fid_rise", FID, "<=", challenger if new_fid is None else champion)
    else:
        fid_rule = Rule("max_fid_rise", FID, new_fid, "<=", fid_limit, champion=old,
                        status=PASS if new_fid <= fid_limit else FAIL,
                        note=f"relative: champion's FID x {1 + rules.max_fid_rise:g}")  # fmt: skip
    checks += [
        versus_rule("max_prompt_following_drop", FOLLOWING, challenger, champion, ">=",
                    rules.max_prompt_following_drop),
        versus_rule("max_fidelity_drop", EXACT, challenger, champion, ">=",
                    rules.max_fidelity_drop),
        _nll_rule(challenger, champion, rules),
        fid_rule,
    ]  # fmt: skip
    return _outcome(tuple(checks), "against the champion")


def _nll_rule(challenger: dict, champion: dict, rules: RegistryConfig) -> Rule:
    tokenizers = challenger.get("image_tokenizer"), champion.get("image_tokenizer")
    if all(tokenizers) and tokenizers[0] != tokenizers[1]:
        note = "other image tokenizer: bits of other codes do not compare"
        new, old = challenger["metrics"].get(BITS), champion["metrics"].get(BITS)
        return Rule("max_nll_rise", BITS, new, "<=", None, champion=old,
                    status=NOT_APPLIED, note=note)  # fmt: skip
    return versus_rule("max_nll_rise", BITS, challenger, champion, "<=", rules.max_nll_rise)


def _outcome(checks: tuple[Rule, ...], against: str) -> Decision:
    failed = [rule for rule in checks if not rule.passed]
    skipped = [rule.name for rule in checks if rule.status == NOT_APPLIED]
    unapplied = f"; not applied: {', '.join(skipped)}" if skipped else ""
    if not failed:
        return Decision(
            "promote", f"promoted: every applied rule passed ({against}){unapplied}", checks
        )
    detail = ", ".join(rule.describe() for rule in failed)
    return Decision("reject", f"rejected ({against}): {detail}{unapplied}", checks)


def registered_version(client, name: str, digest: str) -> str | None:
    """The newest version of `name` whose `registration_digest` is `digest`, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [int(v.version) for v in versions if v.tags.get(BUNDLE_TAG) == digest]
    return str(max(same)) if same else None


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"{METRIC_TAG}{k}": repr(v) for k, v in metrics.items()}


def set_tags(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:MAX_TAG_CHARS])


def stored_evaluation(client, name: str, version: str) -> dict[str, Any]:
    """A version's evaluation: its register run's `evaluation.json` (with per-prompt values)
    where that run kept one, else what its tags hold."""
    from mlflow.exceptions import MlflowException

    model_version = client.get_model_version(name, version)
    tags = evaluation_from_tags(model_version.tags)
    if not model_version.run_id:
        return tags
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(model_version.run_id, EVALUATION_ARTIFACT, tmp)
            body = json.loads(Path(path).read_text(encoding="utf-8"))
        except (MlflowException, OSError, ValueError) as err:
            log.info("version %s has no stored evaluation (%s): using its tags", version, err)
            return tags
    try:
        evaluation = check_evaluation(body, f"{name} version {version}: {EVALUATION_ARTIFACT}")
    except RegistryError as err:
        log.warning("%s; using the version's tags", err)
        return tags
    return {**evaluation, "image_tokenizer": tags["image_tokenizer"]}


def evaluation_from_tags(tags: dict[str, str]) -> dict[str, Any]:
    """A version's evaluation as the register step tagged it (an empty key if untagged)."""
    metrics = {
        k.removeprefix(METRIC_TAG): float(v) for k, v in tags.items() if k.startswith(METRIC_TAG)
    }
    key = {k: tags.get(f"{KEY_TAG}{k}", "") for k in KEY_FIELDS}
    return {"metrics": metrics, "key": key, "image_tokenizer": tags.get(IMAGE_TOKENIZER_TAG, "")}


def download_bundle(client, config: Config, version: str, dst: Path) -> Path:
    """The bundle folder of a registered version, downloaded under `dst`."""
    import mlflow

    root = client.get_model_version_download_uri(config.registry.model_name, version)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root.rstrip('/')}/artifacts/bundle",
            dst_path=str(dst),
            tracking_uri=config.mlflow_tracking_uri(),
        )
    )


def alias_version(client, name: str, alias: str) -> str | None:
    """The version an alias points at, None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_registered_model(name).aliases[alias])
    except KeyError:
        return None
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def move_champion(client, name: str, version: str) -> str | None:
    """Make `version` the champion; the old one becomes `previous-champion` (returned)."""
    old = alias_version(client, name, CHAMPION)
    if old == version:
        return alias_version(client, name, PREVIOUS)
    # previous-champion first: stopped in between, the aliases still name the old champion.
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
        client.set_model_version_tag(name, version, REPLACED_TAG, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s version %s is the champion (was %s)", name, version, old)
    return old


def promote(client, name: str, version: str, *, reason: str, user: str | None = None) -> dict:
    """A person's promotion of `version`, past the gate; who and why are tagged on it."""
    from mlflow.exceptions import MlflowException

    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as err:
        raise RegistryError(f"model {name!r} has no version {version} ({err.message})") from None
    if alias_version(client, name, CHAMPION) == version:
        raise RegistryError(f"{name} version {version} is already the champion")
    replaced = move_champion(client, name, version)
    set_tags(
        client,
        name,
        version,
        {
            "gate.decision": "manual",
            "promotion.by": user or _user(),
            "promotion.reason": reason,
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return {"champion": version, "previous_champion": replaced}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry nor $USER
        return "unknown"


def rollback(client, name: str, *, reason: str = "", user: str | None = None) -> dict:
    """`champion` ← `previous-champion`; the version rolled back from is tagged.

    `previous-champion` then moves to the version the restored champion had itself
    replaced, so a second rollback goes one further back (or is refused).
    """
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"model {name!r} has no {PREVIOUS!r} alias: no champion to roll back to"
        )
    current = alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous)
    older = client.get_model_version(name, previous).tags.get(REPLACED_TAG)
    if older and older != current:
        client.set_registered_model_alias(name, PREVIOUS, older)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
        older = None
    if current is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        set_tags(
            client,
            name,
            current,
            {
                "rolled_back": f"{stamp} by {user or _user()}: {reason or 'no reason'}",
                "rolled_back.to": previous,
            },
        )
    log.info("%s: champion rolled back from %s to %s", name, current, previous)
    return {"champion": previous, "rolled_back": current, "previous_champion": older}


def status(client, name: str) -> list[dict[str, Any]]:
    """One row per version, newest first: aliases, gate metrics, data digest, gate outcome."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no registered model {name!r} in this store; the pipeline's register step"
                " creates it"
            ) from None
        raise
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags
        rows.append(
            {
                "version": str(version.version),
                "aliases": sorted(aliases.get(str(version.version), [])),
                **{m: _float(tags.get(f"{METRIC_TAG}{m}")) for m in STATUS_METRICS},
                "data_digest": tags.get("data_digest", ""),
                "gate": tags.get("gate.decision", ""),
                "created": version.creation_timestamp,
            }
        )
    return sorted(rows, key=lambda row: int(row["version"]), reverse=True)


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


def status_lines(rows: list[dict[str, Any]]) -> list[str]:
    """`status` rows as an aligned plain-text table, its header first; "-" where empty."""
    header = ("version", "aliases", "following", "bits/token", "exact", "FID", "CLIP", "gate",
              "data digest")  # fmt: skip
    table = [header] + [
        (
            row["version"],
            ",".join(row["aliases"]) or "-",
            *("-" if row[k] is None else f"{row[k]:.4f}" for k in STATUS_METRICS),
            row["gate"] or "-",
            row["data_digest"] or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def write_decision(report: dict[str, Any], out: Path) -> None:
    """`decision.json` (the report) and `decision.md` (the same, for people)."""
    from parti_ops.components.shards import write_json

    write_json(out / DECISION_JSON, report)
    champion = report.get("champion")
    lines = [
        f"# Promotion gate: {report['model_name']} version {report['version']}",
        "",
        f"**{report['outcome']}** — {report['reason']}",
        "",
        "Champion compared: "
        + (
            f"version {champion['version']}"
            + (" (re-evaluated on the challenger's data)" if champion.get("reevaluated") else "")
            if champion
            else "none (the challenger is the champion)"
            if report["outcome"] == UNCHANGED
            else "none (first model)"
        ),
        "",
        "| rule | metric | challenger | champion | 95 % interval | limit | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in report["rules"]:
        result = "**FAIL**" if rule["status"] == FAIL else rule["status"]
        result += f" ({rule['note']})" if rule["note"] else ""
        limit = "" if rule["limit"] is None else f"{rule['op']} {rule['limit']:.4g}"
        span = "" if rule["interval"] is None else _span(rule["interval"])
        if span and rule["champion"] is not None:
            span += " (difference)"
        lines.append(
            f"| {rule['name']} | `{rule['metric']}` | {_cell(rule['value'])}"
            f" | {_cell(rule['champion'])} | {span} | {limit} | {result} |"
        )
    lines += ["", f"Champion after the gate: version {report['champion_after'] or 'none'}", ""]
    (out / DECISION_MD).write_text("\n".join(lines), encoding="utf-8")
