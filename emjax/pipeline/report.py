"""The pipeline's report: `report.md` and a self-contained `report.html` (figures inlined).

A report is a list of sections; each holds paragraphs, figures (PNG paths) and tables. Every
number in a table carries its provenance (model, data, rubric, judge, samples, seed) in its own
columns, so a reader never has to guess what produced it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
from typing import Any, Sequence


@dataclasses.dataclass
class Figure:
  path: str          # PNG file
  caption: str


@dataclasses.dataclass
class Table:
  columns: Sequence[str]
  rows: Sequence[Sequence[Any]]
  caption: str = ""


@dataclasses.dataclass
class Section:
  title: str
  paragraphs: list[str] = dataclasses.field(default_factory=list)
  figures: list[Figure] = dataclasses.field(default_factory=list)
  tables: list[Table] = dataclasses.field(default_factory=list)


def fmt(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def _md_table(table: Table) -> str:
  head = "| " + " | ".join(table.columns) + " |"
  rule = "|" + "|".join("---" for _ in table.columns) + "|"
  body = ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |" for row in table.rows]
  caption = [f"*{table.caption}*", ""] if table.caption else []
  return "\n".join(caption + [head, rule] + body)


def to_markdown(title: str, sections: Sequence[Section], workdir: str) -> str:
  out = [f"# {title}", ""]
  for section in sections:
    out += [f"## {section.title}", ""]
    for p in section.paragraphs:
      out += [p, ""]
    for fig in section.figures:
      rel = os.path.relpath(fig.path, workdir)
      out += [f"![{fig.caption}]({rel})", "", f"*{fig.caption}*", ""]
    for table in section.tables:
      out += [_md_table(table), ""]
  return "\n".join(out)


def _inline_png(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.5}
h1{border-bottom:2px solid #333}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.9em;color:#555}
.caption{font-style:italic;color:#555}
"""


def to_html(title: str, sections: Sequence[Section]) -> str:
  """One file with every figure embedded as a data URI: opens anywhere, no missing images."""
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
  for section in sections:
    parts.append(f"<h2>{html.escape(section.title)}</h2>")
    for p in section.paragraphs:
      parts.append(f"<p>{_inline_md(p)}</p>")
    for fig in section.figures:
      parts.append(f"<figure><img alt='{html.escape(fig.caption)}' src='{_inline_png(fig.path)}'>"
                   f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    for table in section.tables:
      if table.caption:
        parts.append(f"<p class='caption'>{html.escape(table.caption)}</p>")
      head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
      rows = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in table.rows)
      parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
  parts.append("</body></html>")
  return "\n".join(parts)


def _inline_md(text: str) -> str:
  """Minimal inline markdown for paragraphs: `code` and **bold**."""
  import re
  text = html.escape(text)
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def write_report(workdir: str, title: str, sections: Sequence[Section]) -> dict[str, str]:
  missing = [f.path for s in sections for f in s.figures if not os.path.isfile(f.path)]
  if missing:
    raise FileNotFoundError(f"report figures are missing: {missing}")
  md_path = os.path.join(workdir, "report.md")
  html_path = os.path.join(workdir, "report.html")
  for path, text in ((md_path, to_markdown(title, sections, workdir)), (html_path, to_html(title, sections))):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  return {"markdown": md_path, "html": html_path}
