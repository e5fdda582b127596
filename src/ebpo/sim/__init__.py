"""The pieces of ``ebpo simulate`` (see :mod:`ebpo.simulate` for the command).

* :mod:`ebpo.sim.populations`: true success rates from a named distribution, grouped 0/1 rewards.
* :mod:`ebpo.sim.theory`: closed forms and exact sums (HA-DW table and bias, shrinkage MSE) with Monte Carlo checks.
* :mod:`ebpo.sim.baselines`: baseline MSE and zero learning signal, read from the library's estimators.
* :mod:`ebpo.sim.bandit`: the softmax-bandit learning simulation.
* :mod:`ebpo.sim.report`: markdown tables and PNG plots.
"""
