"""paystream: Kafka payments in, gateway-validated, stored exactly once, nothing lost."""

__version__ = "0.3.0"
