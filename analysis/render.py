"""A report is a list of blocks (headings, text, bullet lists, tables, images), written twice: as Markdown that
links the PNGs beside it, and as one self-contained HTML file with the PNGs embedded as data URIs.

Text is text: it holds values any worker on a shared store could have written (class names, params, run ids), so the
HTML escapes all of it, and a link is only ever a `Link` the report built, never markdown found in a string."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str  # one paragraph; `backticks` mark code


@dataclass
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Link:
    """A table cell that links to `url` (made by the report, http or https only; anything else shows the text)."""
    text: str
    url: str

    def __str__(self) -> str:  # the Markdown
        text = self.text.replace("[", "\\[").replace("]", "\\]")
        return f"[{text}]({self.url.replace(')', '%29').replace(' ', '%20')})"


@dataclass
class Table:
    df: pd.DataFrame  # cells already formatted as strings (or Links)
    caption: str = ""


@dataclass
class Image:
    path: Path  # a PNG in the report's folder
    alt: str


@dataclass
class Report:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def _md_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    for b in report.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Text):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            cols = [_md_cell(c) for c in b.df.columns]
            out += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
            out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in b.df.itertuples(index=False)]
            caption = b.caption.replace("*", "\\*")  # "val/*" must not open an emphasis
            out += ["", f"*{caption}*", ""] if b.caption else [""]  # a line right under a table would join it
        elif isinstance(b, Image):
            out += [f"![{b.alt}]({b.path.name})", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped text (quotes too) with `code` made HTML; nothing else in it becomes markup."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=True))


def _cell(value) -> str:
    if isinstance(value, Link):
        if urlsplit(value.url).scheme.lower() not in ("http", "https"):
            return _inline(value.text)
        return f'<a href="{html.escape(value.url, quote=True)}">{html.escape(value.text, quote=True)}</a>'
    return _inline(str(value))


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; white-space: nowrap; }
th { white-space: normal; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
.caption { color: #555; font-style: italic; font-size: 0.9em; }
"""

# Records on the page whether every embedded image decoded, for a headless browser to read (the tests do).
IMAGE_CHECK = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(img => img.complete && img.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded;
  document.body.dataset.imagesBroken = images.length - loaded;
});
"""


def to_html(report: Report) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(report.title)}</title><style>{STYLE}</style>",
           f"<script>{IMAGE_CHECK}</script></head><body>", f"<h1>{html.escape(report.title)}</h1>"]
    for b in report.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):  # wide tables scroll inside the page instead of running off its right edge
            cells = b.df.map(_cell)
            cells.columns = [html.escape(str(c), quote=True) for c in cells.columns]  # to_html leaves them as they are
            out.append('<div class="table-wrap">' + cells.to_html(index=False, border=0, escape=False) + "</div>")
            if b.caption:
                out.append(f'<p class="caption">{_inline(b.caption)}</p>')
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out)


def write(report: Report, folder: Path) -> tuple[Path, Path]:
    """report.md and report.html in `folder`, where the report's PNGs already are."""
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(markdown(report))
    page.write_text(to_html(report))
    return md, page
