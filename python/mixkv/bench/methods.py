"""The compared methods: the full cache and each policy without and with MixKV."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES: tuple[str, ...] = ("snapkv", "pyramidkv", "adakv", "sparsemm")


@dataclass(frozen=True)
class Method:
    """A cache configuration: ``policy`` None is the full (uncompressed) cache."""

    policy: str | None
    mix: bool = False

    @property
    def name(self) -> str:
        if self.policy is None:
            return "full"
        return f"{self.policy}+mixkv" if self.mix else self.policy

    @property
    def label(self) -> str:
        if self.policy is None:
            return "Full cache"
        base = {"snapkv": "SnapKV", "pyramidkv": "PyramidKV", "adakv": "AdaKV", "sparsemm": "SparseMM"}[self.policy]
        return f"{base}+MixKV" if self.mix else base


ALL_METHODS: tuple[Method, ...] = (Method(None), *tuple(Method(p, m) for p in POLICIES for m in (False, True)))


def parse_method(name: str) -> Method:
    """A method from its name: ``full``, a policy, or ``<policy>+mixkv`` (ValueError otherwise)."""
    key = name.strip().lower()
    if key.endswith("+mix"):
        key += "kv"
    for method in ALL_METHODS:
        if method.name == key:
            return method
    raise ValueError(f"methods: unknown method {name!r}; choose from {[m.name for m in ALL_METHODS]}")
