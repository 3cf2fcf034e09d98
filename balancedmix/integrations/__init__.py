"""Integrations of balancedmix with training frameworks.

``balancedmix.integrations.trl`` — :class:`BalancedGRPOTrainer` for TRL's ``GRPOTrainer``;
``balancedmix.integrations.config`` — :class:`BalancedGRPOConfig`, a ``GRPOConfig`` with the
balancedmix fields (imported lazily: importing this package does not import TRL).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BalancedConfig", "BalancedGRPOMixin", "BalancedGRPOTrainer", "ScheduleCallback", "BalancedGRPOConfig"]


def __getattr__(name: str) -> Any:
    if name == "BalancedGRPOConfig":
        from .config import BalancedGRPOConfig

        return BalancedGRPOConfig
    if name in __all__:
        from . import trl as _trl

        return getattr(_trl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
