"""Jobdock: an async REST service that runs jobs in Docker containers."""

__version__ = "0.1.0"
