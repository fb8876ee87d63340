"""Unpickling that can only build the few types a data format is known to hold.

`pickle.load` runs whatever callable a file names (`os.system`, `builtins.eval`, ...), so a planted file runs
code before any check sees its contents. Every global a pickle refers to goes through `find_class` (GLOBAL,
STACK_GLOBAL, INST, OBJ and the copyreg extension codes alike), so refusing there everything but an
allow-list keeps the file from naming anything else. Dicts, lists, tuples, ints, floats, bytes and str are
built by opcodes and need no global at all.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Collection


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names `module.name`, which is not on the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name} is not allowed")
        self.module, self.name = module, name

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, allowed: Collection[tuple[str, str]], encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = frozenset(allowed)

    def find_class(self, module: str, name: str) -> object:
        # Checked on the names exactly as the file spells them, before anything is imported.
        if (module, name) not in self._allowed:
            raise ForbiddenGlobalError(module, name)
        return super().find_class(module, name)


def restricted_loads(data: bytes, allowed: Collection[tuple[str, str]], *, encoding: str = "ASCII") -> object:
    """`pickle.loads(data)` admitting only the globals `(module, name)` in `allowed`.

    Raises `ForbiddenGlobalError` for any other global; other damage raises what `pickle.loads` raises.
    """
    return _RestrictedUnpickler(io.BytesIO(data), allowed, encoding).load()
