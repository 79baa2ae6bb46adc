"""Exceptions shared across xpu_coopt's modules."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and what to install or change."""


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile at run time; the message carries the compiler's log."""
