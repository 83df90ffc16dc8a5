"""Writes docs/metrics.md from the Metrics class (``--check``: exit 1 when the file is stale)."""

from __future__ import annotations

import sys
from pathlib import Path

from billing.metrics import BillingMetrics
from serving.observability.catalogue import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def main(argv: list[str]) -> int:
    text = render(BillingMetrics())
    if "--check" in argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run scripts/metrics_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
