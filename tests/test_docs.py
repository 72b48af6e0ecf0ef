"""The documentation names only what exists: README.md and every page under docs/.

- every relative link points at a file that exists, and a `#anchor` at a heading of that file (as
  GitHub turns headings into anchors);
- every kit file a page names (`configs/...`, `stage1/...`, `bench/...`, `tests/...`, `docs/...`,
  `.ci/...`, or a `name.py` at the top level or in one of those folders) exists;
- every command-line flag (`--key`) a page gives to a kit script is one that script accepts: a field
  of its config dataclass for the trainers (`cli.load_config`: `-` and `_` alike), an
  `add_argument` option for the others (argparse: spelled exactly). A flag given without its script
  must be accepted by some kit script, or be another project's named in FOREIGN_FLAGS. Flags in
  other tools' commands (pip, torchrun, huggingface-cli, img2dataset) are theirs and not checked;
- the line CI runs (after `<!-- test-command -->`) is still there.

Everything is read with `ast` and regular expressions: no kit module is imported, so this costs
well under a second.
"""
import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
KIT_FOLDERS = ("configs", "bench", "tests", "assets", "docs", ".ci", "stage1", "stage2", "analysis",
               "world")
# `--key=value` is how the pages write the override syntax itself, not a flag.
PLACEHOLDER_FLAGS = {"key"}
# Other projects' files and flags the pages name on their own (without the command they belong to).
FOREIGN_FILES = {"docs/PRETRAINED.md": "open_clip", "docs/model_profile.csv": "open_clip"}
FOREIGN_FLAGS = {"use-bn-sync": "open_clip_train", "python-version": "pip download",
                 "platform": "pip download"}


def page_id(page):
    return str(page.relative_to(ROOT))


def anchors(page):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def expand_braces(pattern):
    """configs/nights_{5,10}pct.yaml -> [configs/nights_5pct.yaml, configs/nights_10pct.yaml]."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [name for option in match.group(1).split(",")
            for name in expand_braces(pattern[:match.start()] + option + pattern[match.end():])]


def code_texts(text):
    """What pages write as code: fenced blocks' lines, indented blocks' lines, inline code spans."""
    texts = []
    text = re.sub(r"\\\n\s*", " ", text)  # a command continued on the next line is one command
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        texts += block.splitlines()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    texts += [line[4:] for line in text.splitlines()
              if line.startswith("    ") and not line.lstrip().startswith("-")]
    texts += re.findall(r"`([^`\n]+)`", text)
    return texts


@functools.lru_cache(maxsize=None)
def _module_flags(path):
    """(flags, is_config_script) of one kit script, read from its source."""
    tree = ast.parse(path.read_text())
    flags, config_script = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value[2:] for a in node.args
                      if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
        if (isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None))
                in ("load_config", "start_run")):
            config_script = True
    if config_script:  # the fields of its `class Config` dataclass
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == "Config":
                flags |= {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)}
    return flags, config_script


@functools.lru_cache(maxsize=None)
def script_flags(script):
    """Flags `python SCRIPT` accepts: its own, and those of the kit modules it imports (evaluate.py
    hands `--probe` to analysis/probes.py's parser)."""
    path = ROOT / script
    flags, config_script = _module_flags(path)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        # `from analysis import curves, probes`: the modules too
        if isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            module = ROOT / f"{name.replace('.', '/')}.py"
            if module.exists() and module != path:
                flags |= _module_flags(module)[0]
    return flags, config_script


def accepts(script, flag):
    if flag == "help":  # every command answers --help (argparse's, or cli.config_help)
        return True
    flags, config_script = script_flags(script)
    if config_script:
        return flag.replace("-", "_") in {f.replace("-", "_") for f in flags}
    return flag in flags


def kit_scripts():
    """Scripts run as `python NAME.py` (the root, bench/) and the folders' commands run as
    `python -m folder.module` (named here by their path)."""
    return [p.relative_to(ROOT).as_posix()
            for p in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("*/*.py")]
            if p.parent.name != "tests"]


def flag_uses(text):
    """(script or None, flag) for every `--flag` in the page's code. A command is split at `&&`,
    `;`, `|` and a `#` comment; flags after a kit script belong to it; a segment that starts with
    another tool's name is that tool's."""
    scripts = set(kit_scripts())
    uses = []
    for code in code_texts(text):
        code = re.sub(r"(^|\s)#.*$", "", code)
        for segment in re.split(r"&&|;|\|", code):
            words = [f"{w.replace('.', '/')}.py" if i and words_[i - 1] == "-m" else w
                     for words_ in [segment.split()] for i, w in enumerate(words_)]
            if not words:
                continue
            owner = None
            at = next((i for i, w in enumerate(words) if w in scripts), None)
            if at is None:
                if not words[0].startswith("--"):
                    continue  # another tool's command (pip, huggingface-cli, img2dataset, ...)
            else:
                owner, words = words[at], words[at + 1:]
            for word in words:
                match = re.match(r"--([A-Za-z][\w-]*)", word)
                if match and match.group(1) not in PLACEHOLDER_FLAGS:
                    uses.append((owner, match.group(1)))
    return uses


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_point_at_files_and_headings_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in "
                          f"{linked.relative_to(ROOT)}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_kit_files_exist(page):
    text = page.read_text()
    folders = "|".join(re.escape(f) for f in KIT_FOLDERS)
    named = set(re.findall(rf"(?<![\w./~-])((?:{folders})/[\w.*/{{}},-]*[\w*}}])", text))
    named |= set(re.findall(r"(?<![\w./~-])([A-Za-z_]\w*\.py)\b", text))
    missing = [name for pattern in sorted(named - set(FOREIGN_FILES))
               for name in expand_braces(pattern)
               if not any(list(folder.glob(name))
                          for folder in (ROOT, *(ROOT / f for f in KIT_FOLDERS),
                                         *(ROOT / "tests").glob("*/")))]
    assert not missing, f"{page_id(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_flags_are_accepted_by_their_script(page):
    every_flag = set()
    for script in kit_scripts():
        every_flag |= {f.replace("_", "-") for f in script_flags(script)[0]}
    wrong = sorted({f"{script or '(no script)'} --{flag}"
                    for script, flag in flag_uses(page.read_text())
                    if not (accepts(script, flag) if script
                            else flag.replace("_", "-") in every_flag | set(FOREIGN_FLAGS))})
    assert not wrong, f"{page_id(page)} gives flags that no such script accepts: {wrong}"


def test_the_flag_check_catches_a_wrong_flag():
    """The checker itself: a misspelt trainer key, an argparse flag in the trainers' spelling, a
    flag of another script, and a flag of another tool (not ours, so not flagged)."""
    text = ("    python train_triplet.py configs/nights.yaml --data-root=/x --epohcs 3\n"
            "    python evaluate.py --data_root /x --ckpt a.pt\n"
            "    python demo.py --seeds 0,1 --out_dir x\n"
            "    pip install --no-deps foo && python demo.py --quick\n")
    uses = flag_uses(text)
    rejected = {(s, f) for s, f in uses if not accepts(s, f)}
    assert rejected == {("train_triplet.py", "epohcs"), ("evaluate.py", "data_root"),
                        ("demo.py", "out_dir")}
    assert ("demo.py", "quick") in uses and all(f != "no-deps" for _, f in uses)


def test_readme_keeps_the_command_ci_runs():
    lines = (ROOT / "README.md").read_text().splitlines()
    at = lines.index("<!-- test-command -->")
    command = next(line for line in lines[at + 1:] if not line.startswith("`"))
    assert "python -m pytest" in command
