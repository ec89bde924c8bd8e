"""README.md and docs/ against the code: the code map names the package's files and
nothing else, every config file exists, every command and option exists."""

import pathlib
import re
import shlex

import pytest

from pixelcnn.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GLOBAL_WITH_VALUE = {"--config", "--binding", "--log-dir", "--cpu-devices"}


def _code_map() -> list[str]:
    """The paths the README's code map names: top-level entries, pixelcnn/'s files and
    folders, and the .py files named in a folder's description."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Code map", 1)[1].split("```", 2)[1]
    paths, folder = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        if indent == 0:
            folder = first if first == "pixelcnn/" else ""
            paths.append(first)
            continue
        if indent == 2:  # an entry inside pixelcnn/
            paths.append("pixelcnn/" + first)
            entry = "pixelcnn/" + first if first.endswith("/") else "pixelcnn/"
            folder = entry
        for name in re.findall(r"\b(\w+\.py)\b", line):  # files a description names
            if folder.endswith("/") and folder != "pixelcnn/":
                paths.append(folder + name)
    return paths


def test_the_code_map_matches_the_package():
    named = set(_code_map())
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README's code map names what does not exist: {missing}"
    files = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "pixelcnn").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "pixelcnn"
    }
    unnamed = sorted(files - named)
    assert not unnamed, f"README's code map leaves out {unnamed}"


def _commands(path: pathlib.Path):
    """(line, argv) of every pixelcnn / python main.py command in a document."""
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("pixelcnn ") or line.startswith("python main.py "):
            words = shlex.split(line)
            yield line, words[2:] if words[0] == "python" else words[1:]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_documented_command_and_option_exists(doc):
    seen = 0
    for line, argv in _commands(doc):
        i = 0
        while i < len(argv) and argv[i].startswith("-"):  # the group's options
            assert argv[i] in {*GLOBAL_WITH_VALUE, "--debug"}, f"{doc.name}: {line}"
            i += 2 if argv[i] in GLOBAL_WITH_VALUE else 1
        name = argv[i]
        assert name in main.commands, f"{doc.name}: no command {name!r} in: {line}"
        options = {o for p in main.commands[name].params for o in p.opts}
        for word in argv[i + 1 :]:
            if word.startswith("-"):
                assert word.split("=")[0] in options, f"{doc.name}: {name} has no {word}: {line}"
        for config in (argv[k + 1] for k in range(i) if argv[k] == "--config"):
            assert (ROOT / config).is_file(), f"{doc.name}: {config} does not exist: {line}"
        seen += 1
    if doc.name == "README.md":
        assert seen >= 10  # the parser found the README's commands


def test_every_named_config_file_exists():
    for doc in DOCS:
        for name in re.findall(r"experiments/[\w.-]+\.gin", doc.read_text()):
            assert (ROOT / name).is_file(), f"{doc.name} names {name}, which does not exist"
