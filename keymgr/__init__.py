"""keymgr: graceful rollover of JWT signing keys.

``KeyManager`` is imported lazily so that ``keymgr --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["KeyManager", "__version__"]

if TYPE_CHECKING:
    from keymgr.manager import KeyManager


def __getattr__(name: str) -> Any:
    if name == "KeyManager":
        from keymgr.manager import KeyManager

        return KeyManager
    raise AttributeError(name)
