"""Errors the engine layer raises to its callers (imports nothing, so HTTP code can catch
them without importing the engine)."""


class InvalidRequest(ValueError):
    """A request refused at admission; ``param`` names the field at fault (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailable(RuntimeError):
    """The deployment is restarting, failed, or being unloaded, so the request was not served;
    retrying later may succeed (HTTP 503 with Retry-After)."""


class RequestFailed(RuntimeError):
    """This request failed inside a step; the other requests of the batch went on (HTTP 500).
    The message is safe to show a client: it never carries a traceback."""


class PipelineError(RuntimeError):
    """A pipeline step failed; the message starts with the step's name."""
