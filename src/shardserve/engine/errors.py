"""Errors the engine layer raises to its callers (imports nothing, so HTTP code can catch
them without importing the engine)."""


class EngineUnavailable(RuntimeError):
    """The deployment is stopping or has failed; the request was not accepted."""


class PipelineError(RuntimeError):
    """A pipeline step failed; the message starts with the step's name."""
