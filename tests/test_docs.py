"""The docs say what the code has (issue: README, DESIGN and BENCHMARKS say only what the code does):
README's flag table lists every flag of `cli.py` and no other; the module lists of README, DESIGN
and BENCHMARKS name every module of the tree and none that is gone."""

from __future__ import annotations

import re
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (
    "utilities",
    "utilities/run",
    "utilities/data",
    "utilities/evaluation",
    "utilities/compression",
    "tools",
)
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else None]


def _modules(folder: str) -> set[str]:
    return {p.stem for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}


def test_readme_flag_table_is_the_parser():
    table = _section(ROOT / "README.md", "## Training flags")
    first_columns = " ".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))
    documented = set(FLAG.findall(first_columns))
    parser = {s for a in cli.build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert parser - documented == set(), "flags of cli.py missing from README's table"
    assert documented - parser == set(), "README's table names flags cli.py does not have"


def test_readme_flag_table_defaults_match_the_parser():
    """A row whose flag has a plain default states it (e.g. `-b` 64, `--patience` 3)."""
    table = _section(ROOT / "README.md", "## Training flags")
    defaults = {s: a.default for a in cli.build_parser()._actions for s in a.option_strings}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if not line.startswith("| `") or len(cells) != 3:
            continue
        flags = FLAG.findall(cells[0])
        plain = [f for f in flags if isinstance(defaults.get(f), int | float) and not isinstance(defaults[f], bool)]
        for flag in plain:
            value = defaults[flag]
            shown = {str(value), f"{value:g}", f"{value:.0e}".replace("e-0", "e-")}
            assert any(re.search(rf"(?<![\d.]){re.escape(v)}(?![\d.])", cells[2]) for v in shown), (flag, value, line)


def test_readme_code_layout_names_every_module():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text[text.index("- Code layout") :]
    layout = layout[: layout.index("\n- ", 3) if "\n- " in layout[3:] else None]
    named = set(re.findall(r"`([\w/]+)`", layout))
    for folder in FOLDERS:
        missing = _modules(folder) - named
        assert not missing, f"README's code layout misses {folder}: {sorted(missing)}"
    assert {"run/", "data/", "evaluation/", "compression/", "bench/"} <= named


def test_design_tree_names_every_module():
    tree = _section(ROOT / "docs/DESIGN.md", "## 3. Architecture")
    listed = set(re.findall(r"^\s*([\w]+)\.py\b", tree, flags=re.M))
    for folder in FOLDERS:
        missing = _modules(folder) - listed
        assert not missing, f"DESIGN §3 misses {folder}: {sorted(missing)}"
    everything = set().union(*map(_modules, FOLDERS)) | {"cli", "training"}
    assert listed - everything == set(), "DESIGN §3 lists modules that do not exist"


def test_benchmarks_name_every_benchmark():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    commands = set(re.findall(r"python -m bench\.(\w+)", text))
    assert commands == _modules("bench") - {"common"}, "BENCHMARKS' command list against bench/"
    assert "bench/common.py" in text
