"""The producing side: the confirmed-publish client, jobs built from rows or columns, backfill of a file
and its ``--out`` collection, and results exported to files or copied between stores."""

from inferq.producer.client import Outgoing, Producer, new_job_id
from inferq.producer.rows import job_from_columns, job_from_rows, jobs_from_rows

__all__ = ["Outgoing", "Producer", "job_from_columns", "job_from_rows", "jobs_from_rows", "new_job_id"]
