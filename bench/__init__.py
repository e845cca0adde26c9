"""The inferq benchmark: inferq against the ideal pipeline, a naive pika-tutorial worker and Celery."""
