"""Adapters that bring ebpo's estimators into existing training stacks (TRL; verl is planned)."""
