"""resnet_repro: re-run the mmpretrain ResNet table row by row, and use any row's model.

    from resnet_repro import get_model, inference_model

The API is imported on first use (module `__getattr__`), so `import resnet_repro` stays cheap
(no torch, Hydra or MLflow until something needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["get_model", "inference_model"]
_LAZY = {"get_model": "resnet_repro.api", "inference_model": "resnet_repro.api"}

if TYPE_CHECKING:
    from resnet_repro.api import get_model, inference_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnet_repro' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
