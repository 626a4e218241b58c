#!/usr/bin/env python3
"""docs/settings.md from train_gpt.py's settings classes: every setting by group, each stack's value, what it does.

    python3 tools/settings_doc.py          # rewrite docs/settings.md
    python3 tools/settings_doc.py --check  # exit 1 if docs/settings.md is not what the code says

tests/test_docs.py runs the check, so the page cannot go stale.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

PAGE = ROOT / "docs" / "settings.md"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def settings_markdown() -> str:
    stacks = list(tg.STACKS)
    lines = [
        "# Settings",
        "",
        "Every setting of `train_gpt.py` is an environment variable. `STACK` picks which record's values the others",
        "default to; a variable set explicitly always wins. A stack's value that names another setting (e.g.",
        "`ADAM_WD`) follows that setting unless set itself. Booleans are 0/1. `python3 train_gpt.py --help` prints the",
        "same list.",
        "",
        "This page is generated from the settings classes in `train_gpt.py` by `python3 tools/settings_doc.py`;",
        "a test fails when it is stale.",
    ]
    for group in tg.SETTING_GROUPS:
        title = group.__name__.removesuffix("Settings")
        lines += ["", f"## {title}", "", group.__doc__, ""]
        lines.append("| setting | " + " | ".join(f"`STACK={s}`" for s in stacks) + " | what it does |")
        lines.append("|---|" + "---|" * len(stacks) + "---|")
        for f in fields(group):
            values = " | ".join(f"`{cell(tg.stack_value(s, f.name))}`" for s in stacks)
            lines.append(f"| `{f.name.upper()}` | {values} | {cell(f.metadata['doc'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is stale")
    args = p.parse_args()
    text = settings_markdown()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is stale: run python3 tools/settings_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
