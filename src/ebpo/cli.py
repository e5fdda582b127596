"""The ``ebpo`` command: a thin dispatcher to one module per subcommand.

Each subcommand lives in its own module with a ``main(argv) -> int``; the
dispatcher imports it lazily so ``ebpo --help`` stays fast and a heavy
dependency of one subcommand never slows another.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ebpo.train.cli", "post-train a causal LM with RLVR (default: built-in stepwise reasoning task on CPU)"),
    "simulate": ("ebpo.simulate", "reproduce the papers' theory with simulated rewards (no model)"),
    "compare": ("ebpo.compare", "run methods x group sizes x seeds and report accuracy with CIs and plots"),
    "eval": ("ebpo.evaluate", "evaluate a checkpoint or HF model: avg@k, pass@k, maj@k"),
    "meta": ("ebpo.meta", "meta-learn the GBMPO neural mirror map with evolution strategies"),
}


def _usage() -> str:
    lines = ["usage: ebpo <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'ebpo <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ebpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
