"""balancedmix: measure and correct per-task gradient imbalance in multi-task RL post-training."""

from .methods import MethodContext, available_methods, make_method, register_method
from .optimizer import BalancedOptimizer, GradientMismatchError, NonFiniteGradientError
from .tasks import MissingTaskLabelError, MixedTaskBatchError, TaskError, TaskRegistry, UnknownTaskError

__version__ = "0.1.0"

__all__ = [
    "BalancedOptimizer",
    "GradientMismatchError",
    "NonFiniteGradientError",
    "MethodContext",
    "available_methods",
    "make_method",
    "register_method",
    "TaskRegistry",
    "TaskError",
    "UnknownTaskError",
    "MissingTaskLabelError",
    "MixedTaskBatchError",
    "__version__",
]
