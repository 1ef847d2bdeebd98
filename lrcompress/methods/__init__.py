"""Methods: the factorized modules, and applying a plan to a model."""
