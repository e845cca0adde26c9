"""Talking to RabbitMQ: the queue topology, confirmed publishing, the connection layer every client uses
(connect, retry, reconnect, declare) and the AMQP frames the worker packs and reads itself."""
