"""References between the repository's own files resolve: every ``docs/design.md`` section a
source file, test or document cites exists, no file cites a design document at the top
level, which does not exist (it is ``docs/design.md``), and every image the README embeds and
every relative link of the Markdown documents names a tracked file, so a fresh clone has it."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"design\.md`{0,2},?\s*(?:§|section\s+)?(\d+(?:\.\d+)*)")


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:          # not a git checkout: every file on disk
        return [p for pattern in patterns for p in ROOT.glob("**/" + pattern) if ".venv" not in p.parts]
    return [ROOT / line for line in out.stdout.splitlines()]


def _sections():
    text = (ROOT / "docs" / "design.md").read_text()
    return set(re.findall(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", text, flags=re.M))


def test_every_cited_design_section_exists():
    sections = _sections()
    assert {"1.4", "3.11", "4.2", "4.7"} <= sections       # the headings parse
    missing = []
    for path in _tracked("*.py", "*.md"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for number in CITE.findall(line):
                if number.rstrip(".") not in sections:
                    missing.append(f"{path.relative_to(ROOT)}:{n}: design.md {number}")
    assert not missing, "\n".join(missing)


def test_no_file_cites_a_document_that_is_not_there():
    name = "DESIGN" + ".md"                  # spelled apart so that this file does not cite it
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in _tracked("*.py", "*.md")
           for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if name in line and not (ROOT / name).exists()]
    assert not bad, bad



def test_every_readme_image_is_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme) + re.findall(r'<img[^>]+src="([^"]+)"', readme)
    tracked = {p.resolve() for p in _tracked("*.png", "*.svg", "*.jpg", "*.gif")}
    missing = [link for link in links if not link.startswith("http")
               and (ROOT / link).resolve() not in tracked]
    assert not missing, f"README images that a fresh clone lacks: {missing}"


def test_every_relative_link_of_the_markdown_documents_resolves():
    """``[text](path)`` in the README, ``docs/`` and ``benchmarks/`` names a tracked file
    (or a folder holding one), relative to the document; ``#anchors`` are cut off."""
    tracked = {p.resolve() for p in _tracked("*")}
    folders = {parent for p in tracked for parent in p.parents}
    bad = []
    for doc in _tracked("README.md", "docs/*.md", "benchmarks/*.md"):
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for link in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):   # not in code
                path = link.split("#")[0]
                if not path or re.match(r"[a-z]+:", path):
                    continue
                target = (doc.parent / path).resolve()
                if target not in tracked and target not in folders:
                    bad.append(f"{doc.relative_to(ROOT)}:{n}: {link}")
    assert not bad, "links a fresh clone cannot follow:\n" + "\n".join(bad)
