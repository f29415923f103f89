"""splitleak engine: splitting a causal LM, the wire protocol, parties and training strategies."""

__version__ = "0.1.0"
