"""defect-tune: distributed hyperparameter search for industrial visual-defect classifiers."""

__version__ = "0.1.0"
