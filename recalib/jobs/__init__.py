"""Jobs: records and their state machine, the queue, the worker registry, the reaper.

Neither torch nor FastAPI: the API (``service``) and the worker (``worker``) both import it, and it
imports neither of them. Modules by concept, as in rq: :mod:`.records`, :mod:`.states` (every
status change), :mod:`.job_store`, :mod:`.queue`, :mod:`.workers`, :mod:`.recovery` (the reaper's
passes, retention), :mod:`.storage_wait`, :mod:`.connection`, :mod:`.embedded_redis`. Files and
the store are :mod:`recalib.files`'s, the Redis keys :mod:`recalib.keys`'s; the rules a job
request passes before it is created are :mod:`recalib.admission`'s.
"""
