"""Build TECH_REPORT.pdf from TECH_REPORT.md and the figures it links: `python docs/build_pdf.py`.

pandoc (the pypandoc-binary wheel) turns the Markdown into Typst, typst (its PyPI wheel) typesets
it; both come from requirements-dev.txt, no TeX and no system package. Text the Latin fonts lack
(Chinese, Japanese, Korean) falls back to Droid Sans Fallback (Apache 2.0), the CJK font that the
PyMuPDF wheel carries.
The SHA-256 of the Markdown source is written into the PDF's keywords as `source-sha256:<hex>`, so
`pdf_source_hash` (and tests/test_docs.py) can tell a PDF that is older than its source.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = "source-sha256:"
CJK_FONT = "Droid Sans Fallback"

PREAMBLE = r"""
#set document(title: [__TITLE__], keywords: ("__STAMP__",), date: none)
#set page(paper: "a4", margin: (x: 2.1cm, top: 2.2cm, bottom: 2.3cm),
  numbering: "1", number-align: center,
  header: context { if counter(page).get().first() > 1 [
    #set text(size: 8pt, fill: luma(90)); __SHORT__ #h(1fr) Technical report ] })
#set text(font: ("Libertinus Serif", "__CJK__"), size: 10.5pt, lang: "en")
#set par(justify: true, leading: 0.6em, spacing: 0.95em)
#show raw: set text(font: ("DejaVu Sans Mono", "__CJK__"), size: 0.82em)
#show raw.where(block: true): it => block(fill: luma(245), inset: 6pt, radius: 2pt, width: 100%, it)
#show heading: set text(font: ("Libertinus Serif", "__CJK__"))
#show heading.where(level: 1): it => block(above: 1.5em, below: 0.8em, text(size: 13.5pt, it.body))
#show heading.where(level: 2): it => block(above: 1.2em, below: 0.7em, text(size: 11.5pt, it.body))
#show heading.where(level: 3): it => block(above: 1em, below: 0.6em, text(size: 10.5pt, style: "italic", it.body))
#show link: set text(fill: rgb("#1a4f8a"))
#set table(stroke: (x, y) => if y == 0 { (top: 0.8pt, bottom: 0.5pt) } else { none }, inset: (x: 4pt, y: 3pt))
#show table: set text(size: 8pt)
#show table: it => block(stroke: (bottom: 0.8pt), inset: (bottom: 1pt), it)
#show table: set par(justify: false)
#show table.cell.where(y: 0): set text(weight: "bold")
#show figure.where(kind: table): set figure.caption(position: top)
#show figure.caption: set text(size: 9pt)
#let horizontalrule = line(length: 100%, stroke: 0.4pt)
#align(center)[#block(below: 1.4em)[#text(size: 17pt, weight: "bold", hyphenate: false)[__TITLE__]]]
"""


def source_hash(md: Path) -> str:
    return hashlib.sha256(md.read_bytes()).hexdigest()


def pdf_source_hash(pdf: Path) -> str | None:
    """The source SHA-256 stamped in a PDF built by this script, or None."""
    import pymupdf
    with pymupdf.open(pdf) as doc:
        keywords = doc.metadata.get("keywords") or ""
    match = re.search(STAMP + r"([0-9a-f]{64})", keywords)
    return match.group(1) if match else None


def cjk_font_dir(cache: Path) -> Path:
    """Write PyMuPDF's built-in CJK font where typst can load it. PyMuPDF carries it with a family
    name only; typst also wants the full and PostScript names, which fontTools (a matplotlib
    dependency) adds."""
    import io

    import pymupdf
    from fontTools.ttLib import TTFont
    path = cache / "droid-sans-fallback.ttf"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        font = TTFont(io.BytesIO(pymupdf.Font("cjk").buffer))
        font["name"].setName(CJK_FONT, 4, 3, 1, 0x409)
        font["name"].setName(CJK_FONT.replace(" ", ""), 6, 3, 1, 0x409)
        font.save(str(path))
    return cache


def figure_image(path: str, root: Path) -> str:
    """A typst image call for a figure (a path from the repository root, typst's root here), as wide
    as its shape reads well: wide charts the full text width, square ones narrower."""
    width = "88%"
    file = root / path
    if file.suffix.lower() == ".png" and file.is_file():
        head = file.read_bytes()[:24]
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        aspect = w / max(h, 1)
        width = "100%" if aspect >= 2.4 else "90%" if aspect >= 1.8 else "80%"
    return f'image("/{path}", width: {width})'


def to_typst(markdown: str, digest: str, root: Path = ROOT) -> str:
    """Typst source for the Markdown document: the first `# ` line is the title."""
    import pypandoc
    lines = markdown.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError("the document must start with a '# Title' line")
    title = lines[0][2:].strip()
    body = pypandoc.convert_text("\n".join(lines[1:]), "typst",
                                 format="markdown+gfm_auto_identifiers",
                                 extra_args=["--shift-heading-level-by=-1", "--columns=10000",
                                             "--wrap=none"])
    body = re.sub(r'image\("([^"/][^"]*)"\)', lambda m: figure_image(m.group(1), root), body)
    short = title.split(":")[0]
    preamble = (PREAMBLE.replace("__TITLE__", title).replace("__SHORT__", short)
                .replace("__STAMP__", STAMP + digest).replace("__CJK__", CJK_FONT))
    return preamble + "\n" + body


def build(md: Path, pdf: Path, root: Path = ROOT) -> Path:
    import typst
    digest = source_hash(md)
    source = to_typst(md.read_text(encoding="utf-8"), digest, root)
    with tempfile.TemporaryDirectory() as tmp:
        fonts = cjk_font_dir(Path(tmp) / "fonts")
        typst.compile(source.encode("utf-8"), output=str(pdf), root=str(root), font_paths=[str(fonts)])
    return pdf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default=str(ROOT / "TECH_REPORT.md"))
    p.add_argument("--out", default=None, help="PDF path (default: the source's name with .pdf)")
    args = p.parse_args(argv)
    md = Path(args.source).resolve()
    if not md.is_file():
        print(f"build_pdf: {md}: no such file", file=sys.stderr)
        return 2
    pdf = Path(args.out) if args.out else md.with_suffix(".pdf")
    build(md, pdf, root=md.parent)
    import pymupdf
    with pymupdf.open(pdf) as doc:
        pages = doc.page_count
    print(f"{pdf}: {pages} pages, {STAMP}{source_hash(md)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
