"""A faster Triton interpreter for the test suite: the same kernels, the same arithmetic, less setup.

Each call of a @triton.jit helper function from within a kernel makes the interpreter patch
triton.language for the interpreter anew, and each patch lists every member of five modules and classes
with inspect.getmembers to find the builtins: over a third of the time the end-to-end Triton tests took
(stories260K greedy, 24 tokens: 26.5 s -> 17.3 s with the names listed once). The builtins' names do not
change, so they are listed once here; a member an earlier patch already replaced is left as the
interpreter leaves it (it patches only what is still a builtin). Nothing the kernels compute changes."""

from __future__ import annotations

import inspect
import sys


def list_builtins_once() -> None:
    from triton.language import core
    from triton.runtime import interpreter

    if not all(hasattr(interpreter, name) for name in ("_patch_builtin", "_patch_attr")):
        print(
            "tests/triton_interpreter.py: this triton's interpreter has no _patch_builtin / _patch_attr: "
            "the tests run on its own (slower) patching",
            file=sys.stderr,
        )
        return
    builtin_names: dict[object, list[str]] = {}

    def patch_builtins(pkg, builder, scope) -> None:
        if pkg not in builtin_names:
            builtin_names[pkg] = [name for name, member in inspect.getmembers(pkg) if core.is_builtin(member)]
        for name in builtin_names[pkg]:
            member = getattr(pkg, name)
            if core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtins
