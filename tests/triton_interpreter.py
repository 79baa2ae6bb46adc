"""A faster Triton interpreter for the test suite: the same kernels, the same arithmetic, less setup.

The interpreter runs a kernel as Python over numpy, and much of its time goes to setup it repeats
without need; three repeats are cut here. Measured on stories260K, a Triton greedy generation of 9 tokens
after a warm-up: 7.1 -> 5.5 s with a 16-bit cache, 9.1 -> 7.2 s with FP8 for the first and third cuts,
against the second alone (an older cut: 26.5 s -> 17.3 s for 24 tokens).
- Each call of a @triton.jit helper function from within a kernel patches triton.language for the
  interpreter anew, though the kernel's launch patched the same modules with the same values (the patches
  set fixed members; none wraps what it finds) and restores them only when the kernel ends. A helper
  call inside a running kernel whose modules the launch already patched now skips it.
- Each patch lists every member of five modules and classes with inspect.getmembers to find the builtins.
  Their names do not change, so they are listed once; a member an earlier patch already replaced is left
  as the interpreter leaves it (it patches only what is still a builtin).
- Each numpy dtype lookup builds a dictionary of every Triton dtype; the lookups are now remembered.
Nothing the kernels compute changes. Each cut checks that the interpreter still has what it replaces and
says so on stderr where it does not (the tests then run on the interpreter's own, slower, setup)."""

from __future__ import annotations

import functools
import inspect
import sys

# What the cuts below replace or call in triton.runtime.interpreter.
_REPLACED = (
    "_patch_builtin",
    "_patch_attr",
    "_patch_lang",
    "_get_np_dtype",
    "GridExecutor",
    "_LangPatchScope",
)


def speed_up_the_interpreter() -> None:
    from triton.runtime import interpreter

    missing = [name for name in _REPLACED if not hasattr(interpreter, name)]
    if missing:
        print(
            f"tests/triton_interpreter.py: this triton's interpreter has no {', '.join(missing)}: "
            "the tests run on its own (slower) setup",
            file=sys.stderr,
        )
        return
    _list_builtins_once(interpreter)
    _patch_helpers_inside_a_kernel_once(interpreter)
    interpreter._get_np_dtype = _remembered_by_element(interpreter._get_np_dtype)


def _list_builtins_once(interpreter) -> None:
    from triton.language import core

    builtin_names: dict[object, list[str]] = {}

    def patch_builtins(pkg, builder, scope) -> None:
        if pkg not in builtin_names:
            builtin_names[pkg] = [name for name, member in inspect.getmembers(pkg) if core.is_builtin(member)]
        for name in builtin_names[pkg]:
            member = getattr(pkg, name)
            if core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = patch_builtins


def _patch_helpers_inside_a_kernel_once(interpreter) -> None:
    import triton.language as tl

    patch_lang, run_grid = interpreter._patch_lang, interpreter.GridExecutor.__call__
    # The modules a patch covers: those of triton.language among a function's globals (as _patch_lang
    # finds them), by the globals' dictionary (one per module, and a module's imports do not change).
    modules_of: dict[int, frozenset[int]] = {}
    # The modules patched since the running kernel's launch began (the launch's own patch first, which it
    # restores at its end); None outside a kernel.
    patched: frozenset[int] | None = None

    def languages(fn) -> frozenset[int]:
        key = id(fn.__globals__)
        if key not in modules_of:
            found = (value for value in fn.__globals__.values() if inspect.ismodule(value))
            modules_of[key] = frozenset(id(module) for module in found if module in (tl, tl.core))
        return modules_of[key]

    def patch_lang_once(fn):
        nonlocal patched
        needed = languages(fn)
        if patched is not None and needed and needed <= patched:
            return interpreter._LangPatchScope()  # an earlier patch of this launch holds
        # The launch's own patch, or a helper of another module (tl.max, of triton.language.standard, sees
        # tl.core): patched once for the rest of the launch (a helper's patch is never restored, by the
        # interpreter too).
        if patched is not None:
            patched |= needed
        return patch_lang(fn)

    def run_grid_patching_once(self, *args, **kwargs):
        nonlocal patched
        patched = frozenset()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched = None

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = run_grid_patching_once


def _remembered_by_element(get_np_dtype):
    """get_np_dtype (a Triton dtype's numpy dtype) with its results remembered. A block's is its
    element's (a pointer's uint64 both ways). Blocks and pointers are not hashable: a block is looked up
    by its element, a pointer as before (its answer is the lookup's first test)."""
    import triton.language as tl

    remembered = functools.cache(get_np_dtype)

    @functools.wraps(get_np_dtype)
    def get(tt_dtype):
        element = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        return get_np_dtype(element) if isinstance(element, tl.pointer_type) else remembered(element)

    return get
