"""Export, build, evaluate and predict: the submission side of the toolkit."""

__version__ = "0.1.0"
