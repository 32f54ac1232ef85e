"""``python -m monai_cft.data {synthetic,datalist,prepare} ...``: the data command-line tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from monai_cft.utils.cli import run_cli

_COMMANDS = {
    "synthetic": "generate a synthetic LAD CCTA dataset (raw layout)",
    "datalist": "write dataset.json for a raw folder of your own images and centrelines",
    "prepare": "straighten a raw dataset into the 2D sCPR dataset",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``monai_cft.data.<command>.main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in _COMMANDS:
        lines = "\n".join(f"  {name:<10} {text}" for name, text in _COMMANDS.items())
        print(f"usage: python -m monai_cft.data <command> [options]\n\ncommands:\n{lines}")
        if args and args[0] not in ("-h", "--help"):
            print(f"\nunknown command {args[0]!r}", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(f"monai_cft.data.{args[0]}").main(args[1:])


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
