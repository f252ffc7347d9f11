"""Argument parsing shared by the commands, and the error convention (one line, exit status 2)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from mixkv.tools._cache import MIX_VARIANTS, POLICIES
from mixkv.tools._models import DTYPES, ToolError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ToolError(message)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=f"mixkv {prog}", description=description)


def add_model_args(p: argparse.ArgumentParser, *, default_device: str = "cpu") -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model directory or id (default: the packaged tiny Qwen2-VL configuration with random weights)",
    )
    p.add_argument("--device", default=default_device, help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default: %(default)s)")


def parse_mix(value: str | None, flag: bool) -> bool | str:
    if value is None:
        return flag
    if value not in MIX_VARIANTS:
        raise ToolError(f"--mix must be one of {', '.join(MIX_VARIANTS)}, got {value!r}")
    return value


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="snapkv", help=f"{', '.join(POLICIES)} or full (default: %(default)s)")
    p.add_argument(
        "--mix",
        nargs="?",
        const="mixkv",
        default=None,
        metavar="VARIANT",
        help=f"score tokens with MixKV (bare flag) or a variant: {', '.join(MIX_VARIANTS)}",
    )
    p.add_argument("--budget", type=int, default=64, help="tokens kept per head, window included (default: 64)")
    p.add_argument("--window", type=int, default=32, help="observation window (default: %(default)s)")
    p.add_argument("--sparsemm-table", default=None, help="SparseMM visual-head JSON (for --policy sparsemm)")
    p.add_argument("--redundancy-table", default=None, help="offline head-redundancy JSON (MixKV format)")


def run(command: str, body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``body``; a ToolError becomes a one-line message on stderr and exit status 2."""
    try:
        with warnings.catch_warnings():
            # transformers 5 announces a rename of generate's `past_key_values`; the cache API uses that name
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            return body(argv)
    except ToolError as exc:
        print(f"mixkv {command}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
