"""A run's inputs: uploads and URIs, fetched under the outbound rules, cached, put in place.

:mod:`.job_inputs` (:class:`~recalib.inputs.job_inputs.JobInputs`: each input of a run in its
directory, and where it came from, for the report) over :mod:`.uri_fetch` (one fetcher per URI
scheme, ``https``, ``s3``, ``models``, and the create-time checks admission runs), :mod:`.cache`
(the worker's inputs by sha256, and what each URI gave last) and :mod:`.outbound`, the base: which
addresses recalib may contact on a user's behalf (SSRF protection; webhooks use it too).
"""
