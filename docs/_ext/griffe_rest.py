"""Griffe extension: render the reST bits of lightning-mtp's docstrings as Markdown for mkdocstrings.

The package's docstrings are Google style with a few Sphinx roles (``:class:`Drafter```) and reST literal
blocks (a paragraph ending in ``::`` followed by an indented block). This turns roles into inline code (the
last component of a ``~``-prefixed path) and literal blocks into fenced ``text`` blocks. The source stays as
it is; only what the API reference shows changes.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _literal_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.strip().startswith(".."):
            head = line.rstrip()[:-2].rstrip()
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block_start = j
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                j += 1
            body = lines[block_start:j]
            while body and not body[-1].strip():
                body.pop()
            if body:
                strip = min(len(b) - len(b.lstrip()) for b in body if b.strip())
                pad = " " * indent
                if head.strip():
                    out.append(head + ":")
                out += ["", pad + "```text", *[pad + b[strip:] for b in body], pad + "```", ""]
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _literal_blocks(_ROLE.sub(_role, obj.docstring.value))
