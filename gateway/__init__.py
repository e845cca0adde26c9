"""The HTTP API (``inferq serve``): Open Inference Protocol requests in, jobs published with confirms,
operation records shared by replicas, each answered only with its own job's result or dead letter."""
