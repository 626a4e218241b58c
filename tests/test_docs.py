"""README's settings table lists every setting of train_gpt.py with its real default, and nothing else."""

import re
from pathlib import Path

import train_gpt as tg

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_settings_table_matches_defaults():
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", README.read_text(encoding="utf-8"), flags=re.M))
    assert set(rows) == set(tg.DEFAULTS)
    for name, default in tg.DEFAULTS.items():
        assert rows[name] == str(default), name


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"^python3 -m pytest -q$", ci, flags=re.M).group(0)
    assert f"`{command}`" in README.read_text(encoding="utf-8")
