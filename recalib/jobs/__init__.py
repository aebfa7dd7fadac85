"""The job layer: records and their state machine, the queue, the worker registry, storage.

Neither torch nor FastAPI: the API (``service``) and the worker (``worker``) both import it, and it
imports neither of them. Modules by concept, as in rq: :mod:`.records`,
:mod:`.states` (every status change), :mod:`.job_store`, :mod:`.queue`, :mod:`.workers`,
:mod:`.recovery` (the reaper's passes, retention), :mod:`.file_store`, :mod:`.upload_area`,
:mod:`.artifact_store`, :mod:`.connection`, :mod:`.embedded_redis`.
"""
