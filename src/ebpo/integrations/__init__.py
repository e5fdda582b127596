"""Adapters that bring ebpo's estimators, weightings and divergences into existing training stacks: TRL and verl."""
