"""melora-tune: budget-constrained hyperparameter search for parameter-efficient fine-tuning."""

__version__ = "0.1.0"
