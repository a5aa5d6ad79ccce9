"""The documentation is tested: every code reference `file.py:FIRST-LAST name` in README.md and docs/*.md points
at the named function or class, every command in the README's ```bash blocks uses scripts and flags that exist,
every link points at a file of the repository, the README stays a page (at most 200 lines), and the README's quick
start runs end to end as written and ends in the success range the README states."""

import ast
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import grid  # noqa: E402  (its --help parser serves here too)

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
REF = re.compile(r"`([\w./-]+\.py):(\d+)-(\d+) ([\w.]+)`")
SLACK = 3  # lines a reference's range may extend beyond its function


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ code references
@functools.cache
def definitions(path: str) -> dict:
    """{name: [(first, last), ...]} of every def/class in a file (methods also as Class.method), and the
    `if __name__ == "__main__":` block as __main__. `first` includes decorators."""
    tree = ast.parse(read(path))
    out = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                for name in {child.name, prefix + child.name}:
                    out.setdefault(name, []).append((first, child.end_lineno))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
                out.setdefault("__main__", []).append((child.lineno, child.end_lineno))
                visit(child, prefix)

    visit(tree, "")
    return out


def references():
    for doc in DOCS:
        for i, line in enumerate(read(doc).splitlines(), 1):
            for m in REF.finditer(line):
                yield (
                    os.path.relpath(doc, ROOT),
                    i,
                    m.group(0),
                    m.group(1),
                    int(m.group(2)),
                    int(m.group(3)),
                    m.group(4),
                )


def test_docs_have_code_references():
    refs = [r for r in references() if r[0] == os.path.join("docs", "algorithms.md")]
    assert len(refs) >= 20, "docs/algorithms.md should point at the code that computes each formula"


def test_code_references_point_at_the_named_function():
    """A reference is right if the function lies within its range (give or take SLACK lines), or if the range is
    a part of the function's body. The message says where each wrong one's function is now."""
    bad = []
    for doc, line, text, path, first, last, name in references():
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            bad.append(f"{doc}:{line}: {text}: no file {path}")
            continue
        spans = definitions(full).get(name, [])
        ok = any(
            (first - SLACK <= a and b <= last + SLACK and first <= a + SLACK and b - SLACK <= last)
            or (a <= first <= last <= b)
            for a, b in spans
        )
        if not ok:
            where = ", ".join(f"`{path}:{a}-{b} {name}`" for a, b in spans) or f"nowhere: no def/class {name} in {path}"
            bad.append(f"{doc}:{line}: {text} is off; {name} is now at {where}")
    assert not bad, "code references to fix:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------ README commands
def bash_blocks(text: str):
    """(heading of the section, commands) of every ```bash block; continuation lines joined, comments dropped."""
    heading = ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
            continue
        lines = re.sub(r"\\\n\s*", " ", m.group(2)).splitlines()
        cmds = []
        for line in lines:
            for part in re.split(r"&&|;|\|\|?", line.split(" #")[0] if not line.startswith("#") else ""):
                if part.strip():
                    cmds.append(part.strip())
        yield heading, cmds


def python_commands(cmds):
    """(script, subcommand or None, words) of every `python SCRIPT.py ...` command."""
    for cmd in cmds:
        words = shlex.split(cmd)
        for i, w in enumerate(words[:-1]):
            if re.fullmatch(r"(.*/)?python3?", w) and words[i + 1].endswith(".py"):
                script, rest = words[i + 1], words[i + 2 :]
                sub = rest[0] if script.endswith("grid.py") and rest and not rest[0].startswith("-") else None
                yield script, sub, rest


def readme():
    return read(os.path.join(ROOT, "README.md"))


def test_readme_commands_use_existing_scripts_and_flags():
    checked, bad = 0, []
    for heading, cmds in bash_blocks(readme()):
        for script, sub, words in python_commands(cmds):
            if not os.path.isfile(os.path.join(ROOT, script)):
                bad.append(f"[{heading}] {script}: no such script")
                continue
            flags = grid.script_flags(script + (f" {sub}" if sub else ""))
            for w in words:
                flag = w.split("=")[0]
                if flag.startswith("--") and flag not in flags:
                    bad.append(f"[{heading}] python {script} {sub or ''}: unknown flag {flag}")
            checked += 1
    assert checked >= 10 and not bad, "\n".join(bad) or f"only {checked} commands found"


def test_readme_install_and_test_commands():
    text = readme()
    assert "pip install torch==2.13.0" in text and "pip install -r requirements.txt" in text
    assert "python -m pytest -q -n 2 tests" in text
    pins = requirement_lines(os.path.join(ROOT, "requirements.txt"))
    assert "torch==2.13.0" in pins and any(line.startswith("pytest-xdist==") for line in pins)


def requirement_lines(path: str) -> list:
    """The requirement lines of a pip requirements file, those of the files it includes (-r) in place."""
    out = []
    for line in read(path).splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out += requirement_lines(os.path.join(os.path.dirname(path), line[3:].strip()))
        elif line:
            out.append(line)
    return out


def test_docs_point_nowhere_outside_the_repository():
    for doc in DOCS + [os.path.join(ROOT, "tests", "data", "README.md")]:
        text = read(doc)
        for bad in ("SPEC", "/work/", "/tmp/", "shared/"):
            assert bad not in text, f"{os.path.relpath(doc, ROOT)} mentions {bad}"


def test_links_and_figures_point_at_files_of_the_repository():
    """Every relative markdown link or figure `[..](path)` / `![..](path)` of README.md and docs/*.md names a file or
    folder that exists, inside the repository (web addresses and in-page anchors aside)."""
    bad = []
    for doc in DOCS:
        for i, line in enumerate(read(doc).splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                path = target.split("#")[0]
                if not path or re.match(r"[a-z]+://", path):
                    continue
                full = os.path.normpath(os.path.join(os.path.dirname(doc), path))
                if not full.startswith(ROOT + os.sep) or not os.path.exists(full):
                    bad.append(f"{os.path.relpath(doc, ROOT)}:{i}: {target}")
    assert not bad, "links to nothing:\n" + "\n".join(bad)


def test_readme_is_a_page():
    assert len(readme().splitlines()) <= 200, "README.md is longer than 200 lines: move details to docs/"


def test_make_quickstart_runs_the_readme_quick_start():
    """`make quickstart` runs the README's quick-start commands, the same words (so the two cannot drift apart)."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = re.search(r"^quickstart:.*?\n((?:\t.*\n)+)", f.read(), re.M).group(1)
    made = [
        " ".join(cmd.replace("$(BIN)/python", "python").split()) for cmd in re.sub(r"\\\n\s*", " ", recipe).splitlines()
    ]
    quick = next(cmds for heading, cmds in bash_blocks(readme()) if heading.lower().startswith("quick start"))
    assert made == [" ".join(c.split()) for c in quick]


def stated_success_range(text: str):
    """(low, high) from the README's quick start: '... expect a final success between LOW and HIGH ...'."""
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"final success between ([0-9.]+) and ([0-9.]+)", section)
    assert m, "the quick start should state the range of its final success: 'final success between A and B'"
    return float(m.group(1)), float(m.group(2))


def test_quick_start_runs_as_written(tmp_path):
    """The README's quick start, command for command (python SCRIPT -> this interpreter and the repository's
    script), in an empty folder with HOME there (so ~/.ogbench is private to the test)."""
    blocks = [cmds for heading, cmds in bash_blocks(readme()) if heading.lower().startswith("quick start")]
    assert blocks, "README.md has no ```bash block under a 'Quick start' heading"
    env = dict(os.environ, HOME=str(tmp_path), MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ran = 0
    for cmd in blocks[0]:
        words = shlex.split(cmd)
        if words[0] not in ("python", "python3"):
            continue
        words = [sys.executable, os.path.join(ROOT, words[1]), *words[2:]]
        r = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        ran += 1
        last = r.stdout
    assert ran >= 2, "the quick start should generate data and train"
    final = last.strip().splitlines()[-1]
    m = re.fullmatch(
        r"final: (\d+) steps, wall time [0-9.]+ min, eval/success=([0-9.]+) eval/episodic_return=(-?[0-9.]+) "
        r"eval/episode_length=([0-9.]+)",
        final,
    )
    assert m, f"the last line does not read as the README shows: {final!r}"
    low, high = stated_success_range(readme())
    shown = re.search(r"^final: (\d+) steps", readme(), re.M)  # the last line the README shows
    assert shown and m.group(1) == shown.group(1) and low <= float(m.group(2)) <= high, (final, (low, high))
