"""The sandbox every job's model runs in: a tenant's model is hostile code.

Three kernel mechanisms, each covering what the others do not:

- :mod:`~worker.sandbox.landlock` (filesystem, TCP, scopes): the job reads only its inputs and
  the Python/torch installation and writes only its output and scratch directories;
- :mod:`~worker.sandbox.syscalls` (seccomp): no new socket, no connection, no program, no new
  process, no tracing; each attempt is reported to the trusted parent and fails the job;
- :mod:`~worker.sandbox.namespaces` (network namespace): no network interface at all.

:mod:`~worker.sandbox.levels` says which of them a level needs and refuses to go on without them
(fail closed); :mod:`~worker.sandbox.confine` applies them, with resource limits, to a job's
process. Torch-free: the worker checks the sandbox before it starts a runner.
"""
