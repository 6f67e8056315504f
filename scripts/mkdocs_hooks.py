"""MkDocs hooks (mkdocs.yml `hooks:`): what the site shows differs from the Markdown source here.

A sample's first line `# Not runnable: <reason>` tells tests/test_docs.py not to run it; it is
for the test, not the reader, so the rendered code block drops it (the source keeps it, and the
reason stays next to the sample for whoever edits it). scripts/check_docs_markup.py then checks
that no such marker reached the built site.
"""

from __future__ import annotations

import re
from typing import Any

# The first line of a highlighted block, as pymdownx.highlight renders a comment.
_MARKER = re.compile(r'(<code>)<span class="c1"># Not runnable: [^<\n]*</span>\n')


def on_page_content(html: str, **kwargs: Any) -> str:
    return _MARKER.sub(r"\1", html)
