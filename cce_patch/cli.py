"""The ``cce-patch`` console script.

cce-patch bench ...      kernel benchmark (python -m cce_patch.bench)
cce-patch e2e ...        training-step benchmark of a real architecture: stock, ours, Liger-Kernel; the largest
                         step that fits (python -m cce_patch.bench.e2e)
cce-patch report X.json  re-render a benchmark JSON as table + plot (python -m cce_patch.bench.report)
cce-patch options        the CCEConfig options table (markdown), as the README shows it
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {
    "bench": "kernel benchmark: ours vs torch, torch.compile, apple CCE, Liger (table, JSON, PNG)",
    "e2e": "training-step benchmark of a real architecture at random init: stock, ours, Liger; max tokens/step",
    "report": "re-render the table and plot of a benchmark JSON",
    "options": "print the CCEConfig options table (markdown)",
}


def _usage() -> str:
    lines = [
        "usage: cce-patch COMMAND [options]   (cce-patch COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:8s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(rest, prog="cce-patch bench")
    if cmd == "e2e":
        from .bench.e2e import main as e2e_main

        return e2e_main(rest, prog="cce-patch e2e")
    if cmd == "report":
        from .bench.report import main as report_main

        return report_main(rest)
    if cmd == "options":
        from .config import options_markdown

        print(options_markdown())
        return 0
    print(f"cce-patch: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
