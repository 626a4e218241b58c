"""The packed train_gpt.py: the self-extracting file whose bytes count as code, and that a record ships."""

from __future__ import annotations

import ast
import lzma
import re

import pytest
from conftest import TRAIN_GPT

import train_gpt as tg


def test_packing_is_deterministic_and_drops_only_comments_and_docstrings():
    source = TRAIN_GPT.read_text(encoding="utf-8")
    packed = tg.pack_code(source)
    assert packed == tg.pack_code(source)
    print(f"packed train_gpt.py: {len(packed.encode())} bytes")  # a reported figure (docs/export.md), not a cap
    program = tg.unpack_code(packed)

    # The same syntax tree once every docstring is gone: comments never reach the tree, docstrings are stripped.
    def without_docstrings(tree):
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(tree)

    assert ast.dump(ast.parse(program)) == without_docstrings(ast.parse(source))
    assert '"""' not in program and "# ----" not in program
    assert not re.search(r"(?m)^[A-Za-z_]\w* = ", program)  # minified (X=1), not the unminified fallback
    # A comment or docstring edit leaves the packed bytes alone; a code edit changes them.
    assert tg.pack_code(source.replace("# -------------------- model", "# model")) == packed
    assert tg.pack_code(source.replace("setting(1337,", "setting(1338,")) != packed


def test_every_literal_statement_goes_and_a_body_left_empty_gets_pass():
    source = (
        'def f(x):\n    """doc"""\n    if x:\n        "note"\n        return 1\n    for _ in ():\n        ...\n'
        '    return 2\n\n\nclass C:\n    "only a docstring"\n'
    )
    want = (
        "def f(x):\n    if x:\n        return 1\n    for _ in ():\n        pass\n    return 2\n\n\nclass C:\n    pass\n"
    )
    assert ast.dump(ast.parse(tg.strip_source(source))) == ast.dump(ast.parse(want))
    space = {}
    exec(tg.strip_source(source), space)
    assert (space["f"](1), space["f"](0)) == (1, 2) and space["f"].__doc__ is None


def test_unpack_refuses_what_is_not_packed():
    with pytest.raises(ValueError, match="not a packed"):
        tg.unpack_code("print('hello')\n")
    good = tg.pack_code("x = 1\n")
    with pytest.raises(ValueError, match="not a packed"):
        tg.unpack_code(good.replace(good[60:70], "~" * 10))
    assert tg.unpack_code(good) == "x=1\n"  # minified: no space where no two word characters meet
    head = good.split('"')[1]
    assert lzma.decompress(tg.base64.b85decode(head)) == b"x=1\n"


def test_the_packed_file_runs_to_the_same_digits(tmp_path, script_env, run_script):
    """A run of the source writes the packed file it counted; running that file gives the same lines and scores."""
    env = dict(ITERATIONS=2, VAL_MAX_TOKENS=1024)
    src = run_script(script_env(tmp_path / "src", **env))
    assert src.returncode == 0, src.stderr[-2000:]
    packed_path = tmp_path / "src" / tg.PACKED_NAME
    assert packed_path.read_text() == tg.pack_code(TRAIN_GPT.read_text())
    # run it from elsewhere, under its own name: nothing depends on the file being called train_gpt.py
    script = tmp_path / "packed" / "train_gpt.py"
    script.parent.mkdir()
    script.write_bytes(packed_path.read_bytes())
    packed = run_script(script_env(tmp_path / "out", **env), script=script)
    assert packed.returncode == 0, packed.stderr[-2000:]
    keep = ("final_", "legal_", "Code size:", "Total submission size", "Serialized model", "step:")

    def scores(text):
        # (run packed, the "source" figure is the program it unpacks: no docstrings or comments to count)
        return [
            ln.split(" eval_time:")[0].split(" train_time:")[0].split(" (packed; source")[0]
            for ln in text.splitlines()
            if ln.startswith(keep) and "_seconds" not in ln
        ]

    assert scores(packed.stdout) == scores(src.stdout) and any(ln.startswith("final_int6") for ln in scores(src.stdout))
    assert f"Code size: {packed_path.stat().st_size} bytes" in src.stdout
    assert (tmp_path / "out" / tg.PACKED_NAME).read_bytes() == packed_path.read_bytes()


def test_minified_whitespace_keeps_strings_words_and_f_strings():
    source = (
        "x = 1 if 'a b' else 2\n"
        "def f(a, *b, **c):\n"
        "    return f\"{a!r} = {b['k  q']}\" + 'it\\'s  ' + \"q'  \" + b'x  y'\n"
        "y = [i for i in range(3) if i is not None and not i in (0,)]\n"
    )
    program = tg.strip_source(source)
    assert ast.dump(ast.parse(program)) == ast.dump(ast.parse(source))
    assert program.startswith("x=1 if'a b'else 2\n") and "{b['k  q']}\"+\"it's  \"+\"q'  \"+b'x  y'" in program
    assert "range(3)if i is not None and(not i in(0,))" in program
