"""Online parts of TIDE: signals, trainer, controller (cost model, gamma choice), drift detection, refit."""
