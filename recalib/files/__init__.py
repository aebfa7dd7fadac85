"""Files: what clients upload and what runs write, and the store both live in.

:mod:`.store` (:class:`~recalib.files.store.FileStore`, uploaded files: the API's and the
worker's one way to them) with :mod:`.index` (its per-tenant listing and sha256 lookup in Redis),
:mod:`.direct_uploads` (presigned multipart uploads straight into an object store),
:mod:`.artifacts` (each run's directory, published to the store), :mod:`.data_dir` (the mark that
tells a worker its store is the API's), over :mod:`.storage`, the base: objects by key on the
local disk or in S3, with the local upload area and the byte meter every write passes through.
No torch, no FastAPI, nothing of the job records.
"""
