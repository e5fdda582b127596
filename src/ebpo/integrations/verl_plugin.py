"""Loaded by verl's external-modules mechanism: ``VERL_USE_EXTERNAL_MODULES=ebpo.integrations.verl_plugin``.

Every verl process (driver and Ray workers) imports this module at the end of
``import verl``. It registers ebpo's advantage estimators in verl's registry
(``algorithm.adv_estimator=ebpo_running`` ...) and routes ``ebpo:...`` KL loss
types to ebpo's divergences (``actor_rollout_ref.actor.kl_loss_type=ebpo:prob_l2``),
hands each batch's topics (``data_source``), prompt keys (``index``, for ``spo`` / ``krpo_carry``) and reward
extra info (``acc``) to the estimators,
under both of verl's trainers, and saves the estimators' state with verl's checkpoints and
restores it when verl resumes. See :mod:`ebpo.integrations.verl`.
"""

from ebpo.integrations.verl import install_batch_forwarding, install_checkpointing, install_divergences, register

REGISTERED = register()
install_divergences()
try:
    FORWARDING = install_batch_forwarding()
except ImportError:  # a process without verl's trainer dependencies: advantages are computed in the driver anyway
    FORWARDING = []
# After the two above: importing verl's trainers binds ray_trainer.compute_advantage (v1's utils) and
# core_algos.kl_penalty (the loss module) by name, so they must already be wrapped.
CHECKPOINTING = install_checkpointing()
