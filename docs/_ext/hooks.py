"""MkDocs hook: show the docs tests' opt-out markers on the rendered page.

A code block that the docs tests cannot run is preceded by ``<!-- not-tested: REASON -->`` (see
tests/test_docs.py). The marker is an HTML comment in the Markdown source; on the site it becomes a visible
one-line note above the block, so readers know the block was not executed.
"""

from __future__ import annotations

import re

_MARKER = re.compile(r"^(?P<indent>[ \t]*)<!--\s*not-tested:\s*(?P<reason>.+?)\s*-->[ \t]*$", re.MULTILINE)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return _MARKER.sub(
        lambda m: f'\n{m["indent"]}<p class="not-tested"><em>Not run by the docs tests: {m["reason"]}.</em></p>\n',
        markdown,
    )
