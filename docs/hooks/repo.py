"""MkDocs hook: the site is built from the repository's own files, never from copies of them.

Two things happen to each page's Markdown before MkDocs reads it:

1. ``<!-- include: FILE -->`` on a line of its own is replaced by the whole of ``FILE`` (a path
   from the repository root, e.g. ``BENCHMARKS.md``); ``<!-- include: FILE | HEADING -->`` by
   the body of the section of ``FILE`` under the heading line ``HEADING`` (written with its
   hashes, e.g. ``## Encrypted aggregation``), up to the next level-1 or level-2 heading; the
   heading line itself is left out (the page gives its own). A missing file or heading fails
   the build, so a renamed README section cannot silently empty a page.
2. A link to a repository file outside ``docs/`` (``[text](../hefl/simulation.py)``,
   ``[test](../tests/test_protocol.py)``) is checked: the file must exist, or the build fails.
   The site has no copy of such a file, so the link becomes the file's path in code
   (``text (`hefl/simulation.py`)``), or a link into ``repo_url`` when mkdocs.yml sets one.

Links between pages are left to MkDocs, which validates them (``validation`` in mkdocs.yml;
warnings are errors under ``strict``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

INCLUDE = re.compile(r"^<!--\s*include:\s*(?P<file>[^|>]+?)\s*(?:\|\s*(?P<heading>.+?)\s*)?-->\s*$",
                     re.MULTILINE)
# an inline code span (left alone), or [text](target) with a target that has no scheme
LINK = re.compile(r"(?P<code>`+[^`\n]*?`+)"
                  r"|(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>[^)\s:#]+)(?P<anchor>#[^)\s]*)?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.MULTILINE | re.DOTALL)


def _section(text: str, heading: str, source: str) -> str:
    lines = text.splitlines(keepends=True)
    start = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        if fenced:
            continue
        if start is None:
            if line.rstrip() == heading:
                start = i + 1
        elif line.startswith("## ") or line.startswith("# "):
            return "".join(lines[start:i]).strip("\n") + "\n"
    if start is None:
        raise PluginError(f"include: {source} has no heading '{heading}' (was it renamed?)")
    return "".join(lines[start:]).strip("\n") + "\n"


def _links(markdown: str, base: Path, ctx: dict) -> str:
    """Rewrite the links of ``markdown``, whose relative targets start from ``base``."""
    root, docs, page_dir = ctx["root"], ctx["docs"], ctx["page_dir"]

    def repl(m: re.Match[str]) -> str:
        target = m.group("target")
        if m.group("code") or target.startswith("/"):
            return m.group(0)
        path = (base / target).resolve()
        if path == docs or docs in path.parents:
            if base == page_dir:
                return m.group(0)  # a page or an asset of the site: MkDocs validates it
            rel = os.path.relpath(path, page_dir).replace(os.sep, "/")
            return f"[{m.group('text')}]({rel}{m.group('anchor') or ''})"
        if root not in path.parents:
            return m.group(0)  # outside the repository: left to MkDocs (a warning)
        if not path.exists():
            raise PluginError(f"{ctx['page']}: link to '{target}': no such file in the repository")
        rel_repo = path.relative_to(root).as_posix()
        if ctx["repo_url"]:
            kind = "tree" if path.is_dir() else "blob"
            url = f"{ctx['repo_url'].rstrip('/')}/{kind}/HEAD/{rel_repo}{m.group('anchor') or ''}"
            return f"[{m.group('text')}]({url})"
        text = m.group("text")
        return f"`{rel_repo}`" if text.strip("`") == rel_repo else f"{text} (`{rel_repo}`)"

    out, last = [], 0
    for f in FENCE.finditer(markdown):  # fenced code blocks are left alone
        out.append(LINK.sub(repl, markdown[last:f.start()]))
        out.append(f.group(0))
        last = f.end()
    out.append(LINK.sub(repl, markdown[last:]))
    return "".join(out)


def _include(markdown: str, ctx: dict) -> str:
    root = ctx["root"]

    def repl(m: re.Match[str]) -> str:
        name, heading = m.group("file"), m.group("heading")
        path = (root / name).resolve()
        if root not in path.parents or not path.is_file():
            raise PluginError(f"{ctx['page']}: include: no file {name} in the repository")
        text = path.read_text(encoding="utf-8")
        text = _section(text, heading, name) if heading else text
        return _links(text, path.parent, ctx)  # its links start from the included file

    return INCLUDE.sub(repl, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs' hook: the page's Markdown with its includes and repository links resolved."""
    docs = Path(config["docs_dir"]).resolve()
    ctx = {
        "root": Path(config["config_file_path"]).resolve().parent,
        "docs": docs,
        "page_dir": (docs / page.file.src_path).parent,
        "page": page.file.src_path,
        "repo_url": config.get("repo_url"),
    }
    return _include(_links(markdown, ctx["page_dir"], ctx), ctx)
