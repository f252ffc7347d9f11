"""`python -m mixkv.bench` runs the benchmark command."""

from __future__ import annotations

import sys

from mixkv.bench.main import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
