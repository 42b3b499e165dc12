"""Failures of the tracking store, importable without importing MLflow (stage error handling)."""


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or used; the message names its URI."""
