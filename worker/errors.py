"""Worker errors: one exception type per stable code, rendered as the string RunPod expects in `error`
(`[CODE] message`, FuselineError's form)."""

from __future__ import annotations

from fuseline.core.errors import ConfigInvalid, FuselineError

# Every code the worker can put at the start of `error`, with what it means for the caller.
# docs/operations.md ("Error codes") documents each one; a test keeps the two in step.
ERROR_CODES: dict[str, str] = {
    "INVALID_INPUT": "The job input failed validation; the message lists every problem and the valid fields.",
    "UNKNOWN_TEMPLATE": "No model folder for the requested template on the volume; the message lists the "
    "templates present.",
    "MODEL_INVALID": "The template's model folder is incomplete, its fuseline.json is missing or names "
    "another template or spec hash, or diffusers could not load it.",
    "IMAGE_INVALID": "An input image (image, mask) is not an acceptable PNG/JPEG/WebP (bad base64, another "
    "format, corrupt, over the byte or pixel limit, inline pictures over RunPod's request body limit), or "
    "generation produced NaN/Inf values or a black frame, also after the fp32 VAE retry.",
    "IMAGE_FETCH_FAILED": "An input image given by URL or s3:// could not be fetched: refused address or "
    "scheme, network error, timeout, HTTP or S3 error (the message carries the status).",
    "OUT_OF_MEMORY": "The GPU ran out of memory, also after freeing cached pipelines and retrying once.",
    "CONFIG_INVALID": "A FUSELINE_* environment variable of the worker is malformed (a deployment problem).",
    "INTERNAL_ERROR": "An unexpected failure inside the worker; the message carries the exception.",
    "UPLOAD_NOT_CONFIGURED": "The job asks for output.return 's3' but the worker has no "
    "FUSELINE_OUTPUT_BUCKET.",
    "UPLOAD_FAILED": "Uploading an image to the output bucket failed (endpoint unreachable, bucket missing, "
    "credentials refused); the images of that job are not kept.",
    "MODE_UNSUPPORTED": "The template's checkpoint cannot serve the job's mode: an inpainting checkpoint "
    "(9-channel UNet) serves inpaint jobs only.",
    "OUTPUT_NOT_ALLOWED": "The job names an output place (output.s3) whose bucket is not on the worker's "
    "FUSELINE_OUTPUT_BUCKETS allow-list; refused before generating.",
    "CUDA_ERROR": "The GPU raised an unrecoverable CUDA error (not out-of-memory); the job fails and the "
    "worker asks RunPod to replace it (refresh_worker).",
}


class WorkerError(FuselineError):
    """A failure reported to the caller as `[CODE] message`; never a traceback."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class InvalidInput(WorkerError):
    code = "INVALID_INPUT"


class UnknownTemplate(WorkerError):
    code = "UNKNOWN_TEMPLATE"


class ModelInvalid(WorkerError):
    code = "MODEL_INVALID"


class ImageInvalid(WorkerError):
    code = "IMAGE_INVALID"


class ImageFetchFailed(WorkerError):
    code = "IMAGE_FETCH_FAILED"


class OutOfMemory(WorkerError):
    code = "OUT_OF_MEMORY"


class InternalError(WorkerError):
    code = "INTERNAL_ERROR"


class UploadNotConfigured(WorkerError):
    code = "UPLOAD_NOT_CONFIGURED"


class UploadFailed(WorkerError):
    code = "UPLOAD_FAILED"


class ModeUnsupported(WorkerError):
    code = "MODE_UNSUPPORTED"


class OutputNotAllowed(WorkerError):
    code = "OUTPUT_NOT_ALLOWED"


class CudaError(WorkerError):
    """A CUDA error that leaves the process's CUDA context unusable: every later job on this worker would
    fail too, so the handler adds `refresh_worker: True` and RunPod replaces the worker after this job."""

    code = "CUDA_ERROR"


# Every error type a job can answer with; CONFIG_INVALID is the settings' (fuseline.core.errors).
ERROR_TYPES: tuple[type[FuselineError], ...] = (
    InvalidInput,
    UnknownTemplate,
    ModelInvalid,
    ImageInvalid,
    ImageFetchFailed,
    OutOfMemory,
    ConfigInvalid,
    InternalError,
    UploadNotConfigured,
    UploadFailed,
    ModeUnsupported,
    OutputNotAllowed,
    CudaError,
)
