"""Admission: the rules a job request passes before it is stored and queued.

Every entrance that creates jobs (``POST /v1/jobs``, the web page's submit form) calls
:func:`admit`, so a request one entrance refuses, every entrance refuses, with the same
:class:`~recalib.errors.UserError` (422 naming the field). A request refused here never reaches
a worker: without these checks, ``options.register`` on a server without MLflow would fail only
after the whole run.

The rules are the packages' own (the files exist: :mod:`recalib.files`; the URIs:
:mod:`recalib.inputs`; the webhook: :mod:`recalib.webhooks.deliveries`; the registry:
:mod:`recalib.registry`); this module, above them all, is the one place that applies them in
order, then creates the job (:mod:`recalib.jobs`).
"""

from __future__ import annotations

from recalib.contract import JobCreate, JobRecord
from recalib.files.store import FileStore
from recalib.inputs.uri_fetch import check_job_uris, fetch_context
from recalib.jobs.job_store import JobStore
from recalib.registry.models import check_configured
from recalib.settings import Settings
from recalib.webhooks.deliveries import check_webhook


def check_request(request: JobCreate, tenant: str, settings: Settings) -> None:
    """The rules that need no stored file; part of :func:`admit`.

    An entrance that stores uploads before admitting (the submit form) calls it first, so that
    a refused request keeps no file.

    Args:
        request: the job asked for.
        tenant: who asks (the webhook's signing secret is the tenant's).
        settings: the server's (outbound rules, webhook secrets, MLflow's tracking URI).

    Raises:
        UserError: the webhook's URL is refused or the tenant has no signing secret
            (``webhook``), or ``options.register`` on a server without a registry.
    """
    check_webhook(request.webhook, tenant, settings)
    if request.options.register is not None:
        check_configured(settings.mlflow_tracking_uri, "options.register")


def admit(
    jobs: JobStore,
    files: FileStore,
    tenant: str,
    request: JobCreate,
    *,
    idempotency_key: str | None = None,
) -> tuple[JobRecord, bool]:
    """Check ``request`` and create its job: the one way a job is created.

    Args:
        jobs: the job store (its settings are the server's).
        files: the file store: the files the request names exist for ``tenant`` (the
            request's URIs pass the fetch rules as far as the API can tell, with this store).
        tenant: who asks.
        request: the job asked for.
        idempotency_key: as :meth:`JobStore.create`.

    Returns:
        ``(record, created)`` of :meth:`JobStore.create`.

    Raises:
        UserError: the request breaks a rule (422 naming the field, the message says the fix);
            nothing is created.
    """
    check_job_uris(request, fetch_context(jobs.settings, files.storage))
    files.require_job_inputs(tenant, request)
    check_request(request, tenant, jobs.settings)
    return jobs.create(tenant, request, idempotency_key=idempotency_key)
