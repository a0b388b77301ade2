"""CPU architecture names: one spelling per CPU, whatever the OS or toolchain calls it.

macOS and Debian say `arm64` where Linux says `aarch64`, Windows says `AMD64` for `x86_64`, and
Debian's `armhf` is Linux's `armv7l`. Every comparison of architectures (the MLmodel's `arch`,
the device's, the machine's) goes through `normalize_arch`.
"""

from __future__ import annotations

import platform

_ALIASES = {
    "arm64": "aarch64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "armhf": "armv7l",
    "armv7": "armv7l",
    "armv7hl": "armv7l",
}


def normalize_arch(name: str) -> str:
    """The one spelling of CPU architecture `name` (`arm64` -> `aarch64`, `amd64` -> `x86_64`...)."""
    key = str(name).strip().lower()
    return _ALIASES.get(key, key)


def machine_arch() -> str:
    """This machine's CPU architecture, normalized."""
    return normalize_arch(platform.machine())
