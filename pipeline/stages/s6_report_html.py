"""report.html: the run's report.md rendered as one self-contained page.

Every image is embedded as a base64 data URI, the CSS and the table-sorting script are inline and a
Content-Security-Policy forbids the page any other source, so the file opens offline, by itself,
wherever it is copied. The page is rendered from the same markdown lines as report.md (one source of
truth for the sections) by a converter for the subset the stages write: `#`–`###` headings,
paragraphs, pipe tables (header row, `|---|` rule, `\\|` escapes), images alone on a line
(`![alt](path relative to the run folder)`) and inline `code`, **bold** and [links](target).

Every table sorts by clicking (or Enter on) a header: numerically when every filled cell of the
column starts with a number (a cell is keyed by its first number, so "7.78 [6.9, 8.6]" sorts as
7.78 and "79.00 (+1.2)" as 79.00), as text otherwise; empty, "n/a", "nan" and "—" cells go last
either way; a second click reverses the order.
"""
from __future__ import annotations

import base64
import html
import json
import mimetypes
import os
import re
from pathlib import Path

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1d2330; background: #fff; margin: 0 auto; padding: 1rem 1.5rem 3rem; max-width: 1500px; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #3b6ea8; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d5dbe5; padding-bottom: .2rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .88em; }
code { background: #f1f3f7; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f8fa; padding: .8rem; overflow: auto; max-height: 40rem; }
nav { background: #f6f8fa; border: 1px solid #d5dbe5; border-radius: 4px; padding: .4rem .8rem; }
nav a { margin-right: 1.1rem; color: #2c5d95; text-decoration: none; white-space: nowrap; }
.table-wrap { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .86rem; }
th, td { border: 1px solid #d5dbe5; padding: .25rem .5rem; vertical-align: top; }
th { background: #e8eef7; cursor: pointer; user-select: none; position: sticky; top: 0; text-align: left; }
th::after { content: " \\2195"; color: #8a96a8; }
th[aria-sort="ascending"]::after { content: " \\2191"; color: #1d2330; }
th[aria-sort="descending"]::after { content: " \\2193"; color: #1d2330; }
tbody tr:nth-child(even) { background: #f8f9fb; }
tbody tr:hover { background: #eef4fc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; margin: .6rem 0 1rem; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { font-size: .8rem; color: #5a6475; }
.missing { color: #a33; }
"""

SORT_JS = r"""
(function () {
  var NUM = /^[+\-\u2212]?(?:\d+\.?\d*|\.\d+)(?:e[+\-]?\d+)?/i;
  var MISSING = /^(?:|n\/a|nan|none|\u2014|-)$/i;
  function key(text) { return parseFloat(text.match(NUM)[0].replace("\u2212", "-")); }
  function sortBy(table, col, th) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var texts = rows.map(function (r) { return r.cells[col] ? r.cells[col].textContent.trim() : ""; });
    var filled = texts.filter(function (t) { return !MISSING.test(t); });
    var numeric = filled.length > 0 && filled.every(function (t) { return NUM.test(t); });
    var order = texts.map(function (t, i) { return i; }).sort(function (a, b) {
      var ma = MISSING.test(texts[a]), mb = MISSING.test(texts[b]);
      if (ma || mb) { return ma === mb ? a - b : (ma ? 1 : -1); }  // missing cells last either way
      var d = numeric ? key(texts[a]) - key(texts[b])
                      : texts[a].localeCompare(texts[b], undefined, {numeric: true, sensitivity: "base"});
      return d ? dir * d : a - b;
    });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    order.forEach(function (i) { body.appendChild(rows[i]); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, col, th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sortBy(table, col, th); } });
    });
  });
})();
"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")
_HEADING = re.compile(r"^(#{1,3}) (.+)$")
_RULE = re.compile(r"^\|?(\s*:?-{3,}:?\s*\|)*\s*:?-{3,}:?\s*\|?$")
_NUMERIC = re.compile(r"^[+\-\u2212]?(\d+\.?\d*|\.\d+)")
CONFIG_ID = "resolved-config"


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def inline(text: str, links: dict[str, str]) -> str:
    """Escaped text with `code`, [links](target) and **bold**; a link whose target is not in `links`
    (in-page anchors for files the page embeds) keeps its text only, so the page refers to nothing outside."""
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=True))

    def link(m: re.Match) -> str:
        target = html.unescape(m.group(2))
        if target.startswith("#"):
            return f'<a href="{html.escape(target)}">{m.group(1)}</a>'
        return f'<a href="{links[target]}">{m.group(1)}</a>' if target in links else m.group(1)

    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", link, out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def split_row(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)]


def table_html(rows: list[str], links: dict[str, str]) -> str:
    """A pipe table (header, rule, body) as a sortable HTML table; rows without a rule stay text."""
    if len(rows) < 2 or not _RULE.match(rows[1].strip()):
        return "".join(f"<p>{inline(r, links)}</p>\n" for r in rows)
    head = "".join(f'<th scope="col">{inline(c, links)}</th>' for c in split_row(rows[0]))
    body = []
    for row in rows[2:]:
        cells = "".join(f'<td{" class=num" if _NUMERIC.match(c) else ""}>{inline(c, links)}</td>'
                        for c in split_row(row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="table-wrap"><table class="sortable"><thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>\n")


def figures_html(images: list[tuple[str, str]], base: Path) -> str:
    parts = []
    for alt, target in images:
        path = base / target
        if path.is_file():
            parts.append(f'<figure><img src="{data_uri(path)}" alt="{html.escape(alt)}">'
                         f"<figcaption>{html.escape(alt)}</figcaption></figure>")
        else:
            parts.append(f'<figure class="missing">missing image: {html.escape(target)}</figure>')
    return '<div class="figures">' + "".join(parts) + "</div>\n"


def _slug(text: str, seen: set[str]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", html.unescape(re.sub(r"<[^>]+>", "", text)).lower()).strip("-") or "section"
    unique, n = slug, 2
    while unique in seen:
        unique, n = f"{slug}-{n}", n + 1
    seen.add(unique)
    return unique


def markdown_to_html(markdown: str, base: Path, links: dict[str, str]) -> tuple[str, list[tuple[str, str]]]:
    """(body HTML, [(id, title) of the `##` sections]) for the markdown subset described above;
    image paths are relative to `base`."""
    out, toc, seen = [], [], {CONFIG_ID}
    para: list[str] = []
    table: list[str] = []
    images: list[tuple[str, str]] = []

    def flush(keep_images: bool = False) -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para), links)}</p>\n")
            para.clear()
        if table:
            out.append(table_html(table, links))
            table.clear()
        if images and not keep_images:
            out.append(figures_html(images, base))
            images.clear()

    for line in markdown.splitlines():
        stripped = line.strip()
        image = _IMAGE.match(stripped)
        heading = _HEADING.match(stripped)
        if not stripped:
            flush(keep_images=True)  # consecutive images, blank lines between, share one row of figures
        elif image:
            flush(keep_images=True)
            images.append((image.group(1), image.group(2)))
        elif stripped.startswith("|"):
            if not table:
                flush()
            table.append(stripped)
        elif heading:
            flush()
            level, title = len(heading.group(1)), inline(heading.group(2), links)
            ident = _slug(title, seen)
            if level == 2:
                toc.append((ident, title))
            out.append(f'<h{level} id="{ident}">{title}</h{level}>\n')
        else:
            if table or images:
                flush()
            para.append(stripped)
    flush()
    return "".join(out), toc


def render_report_html(markdown: str, base: Path, title: str) -> str:
    """The whole page: the report's markdown, a contents bar and the resolved config embedded."""
    config = base / "config.json"
    links = {"config.json": f"#{CONFIG_ID}"} if config.is_file() else {}
    body, toc = markdown_to_html(markdown, base, links)
    nav = "<nav>" + "".join(f'<a href="#{i}">{t}</a>' for i, t in toc) + "</nav>\n" if toc else ""
    first_break = body.find("</h1>\n")  # the contents bar goes right under the title
    if first_break >= 0:
        body = body[:first_break + 6] + nav + body[first_break + 6:]
    else:
        body = nav + body
    if config.is_file():
        try:
            text = json.dumps(json.loads(config.read_text()), indent=2)
        except (OSError, ValueError):
            text = config.read_text(errors="replace")
        body += (f'<details id="{CONFIG_ID}"><summary>Resolved config (<code>config.json</code>)</summary>'
                 f"<pre>{html.escape(text)}</pre></details>\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"{body}<script>{SORT_JS}</script>\n</body>\n</html>\n")


def write_report_html(markdown: str, base: Path, title: str) -> Path:
    """Write <run>/report.html (atomically) from the report's markdown; returns its path."""
    path = base / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report_html(markdown, base, title), encoding="utf-8")
    os.replace(tmp, path)
    return path
