"""The technical document: the PDF build (docs/build_pdf.py), its Chinese rendering, the source stamp
that tells a stale TECH_REPORT.pdf, and the rule that the project's text speaks of the project as it
stands (no work-log words)."""
import re
from pathlib import Path

import pytest

from docs.build_pdf import build, pdf_source_hash, source_hash
from tests.conftest import ROOT

CHINESE = "噪声标签下的鲁棒微调"


def _pdf_text(pdf: Path) -> str:
    import pymupdf
    with pymupdf.open(pdf) as doc:
        return "".join(page.get_text() for page in doc)


def test_a_chinese_page_is_rendered_and_its_text_found(tmp_path):
    md = tmp_path / "report.md"
    md.write_text(f"# 技术报告：{CHINESE}\n\n## 1. 方法\n\n训练集含有{CHINESE}所需的网络图片。Latin text too.\n\n"
                  "| 阶段 | 模块 |\n|:--|:--|\n| 噪声检测 | `app/noise/` |\n", encoding="utf-8")
    pdf = build(md, tmp_path / "report.pdf", root=tmp_path)
    text = _pdf_text(pdf)
    assert CHINESE in text and "方法" in text and "噪声检测" in text and "Latin text too." in text
    import pymupdf
    with pymupdf.open(pdf) as doc:                  # the CJK glyphs come from an embedded font
        fonts = {font[3] for page in doc for font in page.get_fonts()}
    assert any("Droid" in name for name in fonts), fonts


def test_the_stamp_is_the_sources_hash_and_goes_stale_with_it(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Title\n\n## 1. Section\n\nText.\n", encoding="utf-8")
    pdf = build(md, tmp_path / "a.pdf", root=tmp_path)
    assert pdf_source_hash(pdf) == source_hash(md)
    md.write_text("# Title\n\n## 1. Section\n\nText, edited.\n", encoding="utf-8")
    assert pdf_source_hash(pdf) != source_hash(md)


def test_the_committed_pdf_was_built_from_the_current_tech_report():
    pdf = ROOT / "TECH_REPORT.pdf"
    assert pdf.is_file(), "TECH_REPORT.pdf is missing: python docs/build_pdf.py"
    assert pdf_source_hash(pdf) == source_hash(ROOT / "TECH_REPORT.md"), (
        "TECH_REPORT.pdf is older than TECH_REPORT.md: rebuild it with python docs/build_pdf.py")


def test_every_figure_the_report_shows_is_in_the_repository():
    text = (ROOT / "TECH_REPORT.md").read_text(encoding="utf-8")
    figures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert len(figures) >= 5
    assert [f for f in figures if not (ROOT / f).is_file()] == []


# Words of a lab log rather than of a product: issue numbers, numbered work-log entries, rounds and
# sessions of work, superseded designs. Each pattern is matched case-insensitively.
WORK_LOG = [
    r"\bissues? #?\d+",                              # "issue 13" (another repository's issue is allowed)
    r"\bstop \d+\b",                                 # "stop 24"
    r"\b(this|last|previous|earlier|next) (session|round|stop)\b",
    r"\b(first|second|third|previous|old|new|earlier) design\b",
    r"\bpreviously\b",
    r"\bnew:",
    r"\b(at|of|since) commit [0-9a-f]{7,40}\b",
]
OTHER_REPOSITORY = re.compile(r"[\w.-]+/[\w.-]+\s+$")       # "openai/CLIP issue #516"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ".toml", ".cfg"}


def _project_text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "TECH_REPORT.md", *ROOT.glob("run_*.sh")]
    for folder in ("app", "configs", "docker", "bench", "docs"):
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "Dockerfile")
                  and "__pycache__" not in p.parts]
    return files


def work_log_words(text: str) -> list[str]:
    found = []
    for pattern in WORK_LOG:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            if pattern.startswith(r"\bissues?") and OTHER_REPOSITORY.search(text[max(0, m.start() - 60):m.start()]):
                continue
            found.append(m.group(0))
    return found


@pytest.mark.parametrize("text, expected", [
    ("## 4b. The recipe (issue 12)", ["issue 12"]),
    ("Stop 24: the recipe at two images a class", ["Stop 24"]),
    ("what this session measured; the last round's runs", ["this session", "last round"]),
    ("the first design held out 9.2%", ["first design"]),
    ("reported 404 (openai/CLIP issue #516); the second round refits; a stopping rule", []),
])
def test_the_work_log_patterns_find_what_they_should_and_nothing_else(text, expected):
    assert work_log_words(text) == expected


def test_no_work_log_words_in_the_projects_text():
    files = _project_text_files()
    assert any(p.name == "defaults.yaml" for p in files) and any(p.parent.name == "bench" for p in files)
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{number}: {word}" for word in work_log_words(line)]
    assert hits == [], "work-log words (say what the project is, not how it got there):\n" + "\n".join(hits)


def _github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading (and pandoc's gfm_auto_identifiers)."""
    text = re.sub(r"\{[^}]*\}\s*$", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_readme_links_into_the_document_and_the_repository_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    report = (ROOT / "TECH_REPORT.md").read_text(encoding="utf-8")
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", report, flags=re.MULTILINE)}
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any("#" in link for link in links)
    for link in links:
        if link.startswith("http"):
            continue
        path, _, anchor = link.partition("#")
        assert (ROOT / path).exists(), link
        if anchor:
            assert path == "TECH_REPORT.md" and anchor in anchors, link


def test_bench_scripts_name_their_figure_and_import_no_circle():
    import ast
    scripts = {p.stem: p for p in (ROOT / "bench").glob("*.py")}
    imports = {}
    for name, path in scripts.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.removeprefix("bench."))
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("bench.") for a in node.names}
        imports[name] = found & set(scripts)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in imports[start])
    assert [n for n in scripts if reaches(n, n)] == []
    # the first line of each script's docstring names what of TECH_REPORT.md it regenerates
    first = {n: (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").splitlines()[:1]
             for n, p in scripts.items()}
    assert [n for n, line in first.items() if not line or "TECH_REPORT.md" not in line[0]] == []
