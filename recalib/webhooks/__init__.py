"""Webhooks: a job's events sent, signed, to the URL its request named.

:mod:`.sender` (a pass of the API's sender loop: plan, then make the attempts that are due) over
:mod:`.deliveries` (which job events become messages, each message's attempts in Redis, and the
create-time check admission runs) over :mod:`.signing`, the base: the tenants' secrets and the
Standard Webhooks signature. Webhooks read the job records and events (:mod:`recalib.jobs`) and
reach receivers only under the outbound rules (:mod:`recalib.inputs.outbound`).
"""
