"""The workload as RQ jobs (enqueued by path: ``tests.integrations.rq_project.jobs.record``)."""

from __future__ import annotations

from tests.integrations import workload

record = workload.journaled(workload.record)
fail_with_database_error = workload.journaled(workload.fail_with_database_error)
leave_transaction_open = workload.journaled(workload.leave_transaction_open)
