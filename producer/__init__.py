"""The producing side: a confirmed-publish client, job construction helpers and backfill."""

from producer.client import Outgoing, Producer, new_job_id
from producer.rows import job_from_columns, job_from_rows, jobs_from_rows

__all__ = ["Outgoing", "Producer", "job_from_columns", "job_from_rows", "jobs_from_rows", "new_job_id"]
