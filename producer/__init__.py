"""The producing side: a confirmed-publish client, job construction helpers and backfill."""

from producer.client import Outgoing, Producer, new_job_id

__all__ = ["Outgoing", "Producer", "new_job_id"]
