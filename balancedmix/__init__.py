"""balancedmix: measure and correct per-task gradient imbalance in multi-task RL post-training.

The TRL integration lives in :mod:`balancedmix.integrations.trl` (imported lazily: TRL is an extra).
"""

from .logger import JSONLLogger, read_jsonl
from .methods import MethodContext, available_methods, make_method, register_method
from .optimizer import BalancedOptimizer, GradientMismatchError, NonFiniteGradientError, ParametersChangedError
from .sampler import MixtureSampler
from .schedules import (
    Fixed,
    GradientShare,
    LearningProgress,
    SizeProportional,
    Temperature,
    WeightsError,
    WorstTask,
)
from .tasks import MissingTaskLabelError, MixedTaskBatchError, TaskError, TaskRegistry, UnknownTaskError

__version__ = "0.1.0"

__all__ = [
    "BalancedOptimizer",
    "GradientMismatchError",
    "NonFiniteGradientError",
    "ParametersChangedError",
    "MethodContext",
    "available_methods",
    "make_method",
    "register_method",
    "MixtureSampler",
    "Fixed",
    "SizeProportional",
    "Temperature",
    "GradientShare",
    "LearningProgress",
    "WorstTask",
    "WeightsError",
    "TaskRegistry",
    "TaskError",
    "UnknownTaskError",
    "MissingTaskLabelError",
    "MixedTaskBatchError",
    "JSONLLogger",
    "read_jsonl",
    "__version__",
]
