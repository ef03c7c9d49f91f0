"""Fake `apex` with `apex.amp`, in two flavours: Ascend's (Ascend/apex, which patches NVIDIA's through
`patch/npu.patch`) and NVIDIA's (NVIDIA/apex up to the release that removed apex.amp). Test tool, never
imported by production code; install with `common.fakes.installed_apex("ascend" | "nvidia")`.
"""

from __future__ import annotations

from . import amp

__all__ = ["amp"]
