"""portrouter: makes the services of deployed projects reachable."""

__version__ = "0.1.0"
