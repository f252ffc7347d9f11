"""The `mixkv` command: dispatches to one module per subcommand."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module exposing `main(argv: list[str]) -> int`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("mixkv.tools.generate", "generate an answer for an image and a prompt with a compressed cache"),
    "profile": ("mixkv.tools.profile", "measure per-head key redundancy (and visual-head scores) over images"),
    "fidelity": ("mixkv.tools.fidelity", "weight-free fidelity of every policy against the full cache"),
    "bench": ("mixkv.bench.main", "GPU benchmarks: end-to-end efficiency, compression step, batch throughput"),
}


def _usage() -> str:
    lines = ["usage: mixkv <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `mixkv <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mixkv: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest))


if __name__ == "__main__":
    raise SystemExit(main())
