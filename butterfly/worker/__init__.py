"""The worker: ``python -m butterfly.worker --listen HOST:PORT --model IMPORT_PATH``."""

from .service import WorkerService as WorkerService
