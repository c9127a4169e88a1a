"""The documentation holds together: a short README, links that resolve, reproducible studies.

The README is the user guide (at most 300 lines, with the results block that a command
regenerates); `docs/` holds topic pages and `docs/experiments/` the studies. Each study
names, on its `Reproduce:` line, an override file in `experiments/`; each override file
names its preset (`preset: <name>`, which `Config.load` honours) and a study-specific
MLflow experiment, loads with `Config.load`, and is named by some study.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from parti_ops.model.config import Config

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
STUDIES = DOCS / "experiments"
OVERRIDES = ROOT / "experiments"

MAX_README_LINES = 300
RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"

PAGES = sorted([README, *DOCS.rglob("*.md")])
STUDY_PAGES = sorted(STUDIES.glob("*.md"))
OVERRIDE_FILES = sorted(OVERRIDES.glob("*.yaml"))

# Inline links and images, `[text](target)` or `[text](target "title")`.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCED = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_OVERRIDE_NAME = re.compile(r"(?<![\w/.-])experiments/[\w.-]+\.yaml")


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


def _prose(text: str) -> str:
    """Markdown without code: fenced blocks and inline code may hold bracketed text."""
    return _INLINE_CODE.sub("", _FENCED.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in _HEADING.findall(_FENCED.sub("", page.read_text(encoding="utf-8"))):
        plain = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", plain).replace(" ", "-"))
    return anchors


def _reproduce_paragraph(text: str) -> str:
    """The paragraph that starts with `Reproduce:`, up to the next blank line."""
    match = re.search(r"^Reproduce:.*?(?=\n\s*\n|\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(0) if match else ""


def _preset_of(path: Path) -> str:
    """The preset an override file names in its top-level `preset:` key."""
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(tree, dict), f"{path.name}: expected a mapping of config sections"
    preset = tree.get("preset")
    assert isinstance(preset, str) and preset, (
        f"{path.name}: name the preset the study used with a top-level `preset:` key"
    )
    return preset


def test_readme_is_a_short_user_guide():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES} and move "
        "reference material to docs/ and studies to docs/experiments/"
    )


def test_readme_holds_the_results_block_as_a_table():
    text = README.read_text(encoding="utf-8")
    assert text.count(RESULTS_BEGIN) == 1 and text.count(RESULTS_END) == 1, (
        f"README.md needs exactly one {RESULTS_BEGIN} and one {RESULTS_END}"
    )
    block = text.split(RESULTS_BEGIN, 1)[1].split(RESULTS_END, 1)
    assert len(block) == 2, f"{RESULTS_BEGIN} must come before {RESULTS_END}"
    rows = [line for line in block[0].splitlines() if line.strip()]
    assert len(rows) >= 3, "the results block holds a header, a separator and a row"
    assert all(row.lstrip().startswith("|") for row in rows), (
        "the results block is regenerated: keep it a plain Markdown table"
    )
    assert set(rows[1].replace("|", "").strip()) <= set("-: "), "second row: the separator"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if _SCHEME.match(target):
            continue  # http(s), mailto: not checked here (no network)
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no {linked})")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_every_topic_page_and_study_is_linked_from_the_readme_or_docs():
    linked = set()
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if not _SCHEME.match(target) and target.partition("#")[0]:
                linked.add((page.parent / target.partition("#")[0]).resolve())
    orphans = [p for p in DOCS.rglob("*.md") if p.resolve() not in linked]
    assert not orphans, f"pages no other page links to: {_ids(orphans)}"


@pytest.mark.parametrize("page", STUDY_PAGES, ids=_ids(STUDY_PAGES))
def test_study_names_an_override_file_that_reproduces_it(page: Path):
    text = page.read_text(encoding="utf-8")
    reproduce = _reproduce_paragraph(text)
    assert reproduce, f"{page.name}: needs a paragraph starting `Reproduce:`"
    named = _OVERRIDE_NAME.findall(reproduce)
    assert named, f"{page.name}: its Reproduce: paragraph names no experiments/*.yaml"
    missing = [name for name in named if not (ROOT / name).is_file()]
    assert not missing, f"{page.name}: names override files that do not exist: {missing}"
    for name in named:
        experiment = Config.load(_preset_of(ROOT / name), ROOT / name, []).tracking.experiment
        assert f"`{experiment}`" in text, (
            f"{page.name}: say which MLflow experiment its runs go to (`{experiment}`)"
        )


@pytest.mark.parametrize("path", OVERRIDE_FILES, ids=_ids(OVERRIDE_FILES))
def test_override_file_loads_for_its_preset(path: Path):
    preset = _preset_of(path)
    config = Config.load(preset, path, [])  # an unknown preset or key raises, naming it
    assert config.name == preset
    assert config.tracking.experiment != Config.from_name(preset).tracking.experiment, (
        f"{path.name}: set tracking.experiment to a study-specific MLflow experiment"
    )


def test_override_files_are_each_named_by_a_study_and_go_to_their_own_experiment():
    named = set()
    for page in STUDY_PAGES:
        named.update(_OVERRIDE_NAME.findall(page.read_text(encoding="utf-8")))
    unnamed = [p.name for p in OVERRIDE_FILES if f"experiments/{p.name}" not in named]
    assert not unnamed, f"override files no docs/experiments page names: {unnamed}"
    experiments: dict[str, str] = {}
    for path in OVERRIDE_FILES:
        experiment = Config.load(_preset_of(path), path, []).tracking.experiment
        assert experiment not in experiments, (
            f"{path.name} and {experiments.get(experiment)} share the MLflow experiment"
            f" {experiment!r}"
        )
        experiments[experiment] = path.name


def test_the_results_table_is_regenerated_from_evaluations(tmp_path):
    """docs/results.py writes one row per evaluation between the markers, nothing else."""
    import subprocess
    import sys

    evaluation = {
        "metrics": {
            "validation/exact": 0.745, "test/exact": 0.67,
            "validation/prompt_following": 0.8961, "test/prompt_following": 0.85,
            "validation/bits_per_token": 0.4221, "test/bits_per_token": 0.4749,
        },
        "intervals": {"validation/exact": [0.718, 0.771], "test/exact": [0.64, 0.699]},
    }  # fmt: skip
    real_data = {"metrics": {"validation/bits_per_token": 1.5, "test/bits_per_token": 1.6}}
    (tmp_path / "a.json").write_text(json.dumps(evaluation))
    (tmp_path / "b.json").write_text(json.dumps(real_data))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "results.py"), f"tiny, seed 0={tmp_path / 'a.json'}",
         f"emoji={tmp_path / 'b.json'}", "--readme", str(readme)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- results:begin -->\n| run |")
    assert text.endswith("<!-- results:end -->\nafter\n") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1] == (
        "| tiny, seed 0 | 0.896 | 74.5 % [71.8, 77.1] | 0.850 | 67.0 % [64.0, 69.9]"
        " | 0.422 / 0.475 |"
    )
    assert rows[2] == "| emoji | – | – | – | – | 1.500 / 1.600 |"  # no scenes: no oracle
    bad = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "results.py"), f"x={tmp_path}",
         "--readme", str(readme)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "not a readable evaluation.json" in bad.stderr
