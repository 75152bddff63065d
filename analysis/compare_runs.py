"""Put several stas.analyze runs side by side: hierarchy, ratios, period and MA channels per backbone/variant.

    python analysis/compare_runs.py runs/wan/analyze-1 runs/cog/analyze-2 --out comparison/

Writes compare.md, compare.json and compare.png into --out and prints the Markdown table. The same as
`python -m stas.analyze analysis.compare=[...]`, without Hydra.
"""

from __future__ import annotations

import argparse
import sys

from stas.errors import UserError
from stas.ma.compare import compare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="analysis run directories (or sweeps holding them)")
    parser.add_argument("--out", default=".", help="where compare.md/.json/.png go (default: here)")
    args = parser.parse_args(argv)
    try:
        print(compare(args.runs, args.out))
    except UserError as err:
        print(f"compare_runs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
