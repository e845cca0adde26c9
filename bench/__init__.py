"""The inferq benchmark: inferq against a naive pika-tutorial worker and the pipeline ceiling."""
