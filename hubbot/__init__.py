"""hubbot: turn every new release of a model family into validated, quantized variants on the Hub."""

__version__ = "0.1.0"
