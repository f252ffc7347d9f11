"""`python -m mixkv <command>`: the same as the `mixkv` command."""

from mixkv.cli import main

raise SystemExit(main())
