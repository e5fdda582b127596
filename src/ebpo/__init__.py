"""ebpo: Empirical Bayes, history-aware and mirror-descent policy optimisation for RLVR.

The public API is one builder and one lister per kind of component::

    from ebpo import build_estimator, build_divergence, build_policy_loss
"""

from ebpo.estimators import AdvantagePipeline, build_estimator, list_estimators
from ebpo.weighting import list_weightings

__version__ = "0.1.0.dev0"

__all__ = [
    "AdvantagePipeline",
    "build_estimator",
    "list_estimators",
    "list_weightings",
    "__version__",
]
