"""Replace one `## ` section of BENCHMARKS.md, keeping the others (shared by the bench scripts)."""

from __future__ import annotations

import re
from pathlib import Path

HEAD = "# Benchmarks\n\nNumbers below are written by the scripts in bench/; do not edit them by hand.\n"


def replace_section(path: Path, title: str, block: str) -> None:
    """Put `block` (starting with the `title` line) in place of the section `title` of `path`, or append it."""
    text = path.read_text() if path.exists() else HEAD
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = block.rstrip() + "\n\n"
    text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n")
