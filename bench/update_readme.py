"""Copy the latest benchmark tables from bench/results/*.md into README.md.

The README holds marker pairs ``<!-- RESULTS:name -->`` ... ``<!-- /RESULTS:name -->``;
everything between them is replaced by the body of ``bench/results/<name>.md`` (its
first heading dropped), so the README shows exactly what the benchmark scripts wrote.

    python bench/update_readme.py
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"(<!-- RESULTS:(?P<name>[\w.-]+) -->\n)(.*?)(<!-- /RESULTS:(?P=name) -->)", re.S)


def _body(name: str) -> str:
    path = ROOT / "bench" / "results" / f"{name}.md"
    if not path.exists():
        return f"_not measured yet: bench/results/{name}.md is missing_\n"
    lines = path.read_text().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip() + "\n"


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new, n = MARK.subn(lambda m: m.group(1) + _body(m.group("name")) + m.group(4), text)
    if n == 0:
        print("no RESULTS markers in README.md", file=sys.stderr)
        return 1
    readme.write_text(new)
    print(f"updated {n} table(s) in README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
