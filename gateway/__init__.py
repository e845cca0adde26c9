"""The HTTP API (``inferq serve``): Open Inference Protocol requests in, jobs published with confirms,
operation records shared by replicas, results answered from the store."""
