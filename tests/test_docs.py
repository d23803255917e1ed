"""The user-facing pages stay consistent with the repository: README.md, benchmarks/README.md and docs/*.md.

Checked: every relative link and image resolves to a file (and an anchor, when given, to a heading of it);
README.md stays short; no page uses the words "session" or "issue"; every ``--flag`` in README.md is a field
of some command's config dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 220

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
FORBIDDEN = re.compile(r"\b(sessions?|issues?)\b", re.I)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
# flags that are not config fields: argparse's, the --config loader's, and torchrun's
NOT_CONFIG_FLAGS = {"help", "config", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port",
                    "config_file"}  # the launchers' own (torchrun, accelerate launch)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links inside them are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's ``-1``, ``-2`` suffixes for repeated headings."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and (ROOT / "benchmarks" / "README.md").is_file()
    assert len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_link_checker_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\nSee [here](missing.md), ![img](pic.png), `[code](not-a-link)` and\n"
                    "```\n[fenced](also-not)\n```\n[web](https://example.org) [self](#title)\n", encoding="utf-8")
    assert _links(page) == ["missing.md", "pic.png", "https://example.org", "#title"]
    assert _anchors(page) == {"title"}
    assert _slug("Host memory: page faults") == "host-memory-page-faults"
    assert _slug("Several objectives, contrastive DPO, and rounds") == "several-objectives-contrastive-dpo-and-rounds"
    assert _slug("The held-out figures (`alignlab evaluate`)") == "the-held-out-figures-alignlab-evaluate"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} (details go in docs/)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_wording(page):
    hits = [
        f"line {number}: {match.group(0)!r}"
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for match in FORBIDDEN.finditer(line)
    ]
    assert not hits, f"{page.relative_to(ROOT)} uses development wording: {hits}"


def test_forbidden_words_are_whole_words():
    assert FORBIDDEN.search("one Session") and FORBIDDEN.search("issues.")
    assert not FORBIDDEN.search("sessionless") and not FORBIDDEN.search("tissue")


def _import_first(*names: str):
    """The first of the modules ``names`` that imports (a module may have moved to a new package)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # a missing dependency, not a moved module
    raise ModuleNotFoundError(f"none of {names} imports")


def _config_fields() -> set[str]:
    """Field names of every command's config dataclass: the flags ``alignlab`` accepts."""
    import alignlab.algorithms
    from alignlab.train.config import TrainConfig

    modules = [importlib.import_module(f"alignlab.algorithms.{info.name}")
               for info in pkgutil.iter_modules(alignlab.algorithms.__path__)]
    modules += [
        _import_first("alignlab.experiments.compare", "alignlab.compare"),
        _import_first("alignlab.experiments.evaluate", "alignlab.evaluate"),
        _import_first("alignlab.generate", "alignlab.experiments.generate"),
    ]
    classes = {TrainConfig}
    for module in modules:
        classes |= {obj for name, obj in vars(module).items()
                    if name.endswith("Config") and isinstance(obj, type) and dataclasses.is_dataclass(obj)}
    names = {"CompareConfig", "EvaluateConfig", "GenerateConfig", "DPOConfig", "PPOConfig", "GRPOConfig"}
    assert names <= {cls.__name__ for cls in classes}
    return {f.name for cls in classes for f in dataclasses.fields(cls)}


def test_readme_flags_exist():
    fields = _config_fields()
    flags = set(FLAG.findall((ROOT / "README.md").read_text(encoding="utf-8")))
    unknown = sorted(flags - fields - NOT_CONFIG_FLAGS)
    assert flags, "README.md shows no flags"
    assert not unknown, f"README.md mentions flags no config dataclass defines: {['--' + f for f in unknown]}"
