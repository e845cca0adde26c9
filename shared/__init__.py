"""Code both sides of inferq use, one subpackage per concern: the wire contract, the broker, settings and
logging, result stores, S3 plumbing and tables; ``errors`` (failure types, wire codes) and ``extras``
(which optional dependency installs what) sit beside them."""
