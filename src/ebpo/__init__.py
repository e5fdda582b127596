"""ebpo: Empirical Bayes, history-aware and mirror-descent policy optimisation for RLVR.

The public API is one builder and one lister per kind of component::

    from ebpo import build_estimator, build_divergence, build_policy_loss
"""

from ebpo.divergences import build_divergence, list_divergences
from ebpo.estimators import AdvantagePipeline, build_estimator, list_estimators
from ebpo.losses import LossInputs, LossOutputs, build_policy_loss, list_aggregations, list_policy_losses
from ebpo.weighting import list_weightings

__version__ = "0.1.0.dev0"

__all__ = [
    "AdvantagePipeline",
    "LossInputs",
    "LossOutputs",
    "build_divergence",
    "build_estimator",
    "build_policy_loss",
    "list_aggregations",
    "list_divergences",
    "list_estimators",
    "list_policy_losses",
    "list_weightings",
    "__version__",
]
