"""Worker errors: one exception type per stable code, rendered as the string RunPod expects in `error`."""

from __future__ import annotations

# Every code the worker can put at the start of `error`, with what it means for the caller.
# docs/operations.md ("Error codes") documents each one; a test keeps the two in step.
ERROR_CODES: dict[str, str] = {
    "INVALID_INPUT": "The job input failed validation; the message lists every problem and the valid fields.",
    "UNKNOWN_TEMPLATE": "No model folder for the requested template on the volume; the message lists the "
    "templates present.",
    "MODEL_INVALID": "The template's model folder is incomplete, its fuseline.json is missing or names "
    "another template or spec hash, or diffusers could not load it.",
    "NOT_IMPLEMENTED": "The request asks for a feature this worker does not provide yet "
    "(e.g. output.return 's3').",
    "IMAGE_INVALID": "Generation produced NaN/Inf values or a black frame, also after the fp32 VAE retry.",
    "OUT_OF_MEMORY": "The GPU ran out of memory, also after freeing cached pipelines and retrying once.",
    "CONFIG_INVALID": "A FUSELINE_* environment variable of the worker is malformed (a deployment problem).",
    "INTERNAL_ERROR": "An unexpected failure inside the worker; the message carries the exception.",
}


class WorkerError(Exception):
    """A failure reported to the caller as `[CODE] message`; never a traceback."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidInput(WorkerError):
    code = "INVALID_INPUT"


class UnknownTemplate(WorkerError):
    code = "UNKNOWN_TEMPLATE"


class ModelInvalid(WorkerError):
    code = "MODEL_INVALID"


class NotImplementedFeature(WorkerError):
    code = "NOT_IMPLEMENTED"


class ImageInvalid(WorkerError):
    code = "IMAGE_INVALID"


class OutOfMemory(WorkerError):
    code = "OUT_OF_MEMORY"


class ConfigInvalid(WorkerError):
    code = "CONFIG_INVALID"


class InternalError(WorkerError):
    code = "INTERNAL_ERROR"


ERROR_TYPES: tuple[type[WorkerError], ...] = (
    InvalidInput,
    UnknownTemplate,
    ModelInvalid,
    NotImplementedFeature,
    ImageInvalid,
    OutOfMemory,
    ConfigInvalid,
    InternalError,
)
