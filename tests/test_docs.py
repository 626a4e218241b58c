"""The documentation says what the code does: docs/settings.md is generated from the settings classes and shows the
values parse_settings really gives; --help lists every setting; README names CI's test command and nothing outside
the repository; every error train_gpt.py raises says what is wrong."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import train_gpt as tg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import settings_doc  # noqa: E402


def settings_page_rows():
    """{SETTING: [value under each stack]} read back from docs/settings.md."""
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        if m := re.match(r"^\| `([A-Z0-9_]+)` \| (.*) \| [^|]*(?:\\\|[^|]*)* \|$", line):
            rows[m[1]] = re.findall(r"`([^`]*)`", m[2])
    return rows


def test_settings_page_is_what_the_code_generates():
    assert (ROOT / "docs" / "settings.md").read_text(encoding="utf-8") == settings_doc.settings_markdown(), (
        "docs/settings.md is stale: run python3 tools/settings_doc.py"
    )


def test_settings_page_shows_the_values_each_stack_parses_to():
    rows = settings_page_rows()
    assert list(rows) == list(tg.SETTING_NAMES)
    for column, stack in enumerate(tg.STACKS):
        parsed = tg.parse_settings({"STACK": stack, "RUN_ID": "x"}).by_env_name()
        for name, values in rows.items():
            shown = values[column]
            if name == "RUN_ID":
                continue
            if shown in tg.SETTING_NAMES:  # follows another setting: equal to its value
                assert parsed[name] == parsed[shown], (stack, name)
            elif name == "VE_LAYERS":
                assert shown == "9,10" and parsed[name] == ([9, 10] if parsed["VE_ENABLED"] else []), stack
            else:
                assert shown.strip('"') == str(parsed[name]), (stack, name, shown, parsed[name])


def test_help_lists_every_setting_and_starts_no_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_gpt.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  ([A-Z0-9_]+)=", proc.stdout, flags=re.M)
    assert listed == list(tg.SETTING_NAMES)
    assert not list(tmp_path.iterdir())  # no logs/, no packed code: nothing ran


def test_readme_names_the_test_command_that_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^python3 -m pytest -q.*$", ci, flags=re.M).group(0)
    assert f"`{command}`" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_and_docs_cite_no_file_outside_the_repository():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for outside in ("../shared", "SPEC.md", "SPEC §", "MODERN_STACK", "FRONTIER_STACK"):
            assert outside not in text, (page.name, outside)
        for link in re.findall(r"\]\((?!https?:|#)([^)#]+)", text):  # every relative link resolves
            assert (page.parent / link).exists(), (page.name, link)


def raises_without_message(path):
    """(line, source) of every `raise X` / `raise X()` with no message in a Python file (a bare re-raise is fine)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc
            if not isinstance(exc, ast.Call) or not (exc.args or exc.keywords):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_every_raise_in_train_gpt_says_what_is_wrong(tmp_path):
    assert raises_without_message(ROOT / "train_gpt.py") == []
    planted = tmp_path / "planted.py"
    planted.write_text("def f(x):\n    if x:\n        raise ValueError\n    raise KeyError()\n")
    assert sorted(line for line, _ in raises_without_message(planted)) == [3, 4]


def test_every_legality_command_selects_a_test():
    """docs/legality.md gives each ruled pattern a command; each names a test file and a -k expression whose every
    term is in that file (a test name or a parametrize id), so the suite runs what the page shows."""
    text = (ROOT / "docs" / "legality.md").read_text(encoding="utf-8")
    commands = re.findall(r"`python3 -m pytest (tests/\w+\.py) -k \"?([^`\"]+?)\"?`", text)
    assert len(commands) >= 10
    for path, expr in commands:
        source = (ROOT / path).read_text(encoding="utf-8")
        for term in expr.split(" and "):
            assert term.strip() in source, f"docs/legality.md: {path} has nothing named {term!r}"
