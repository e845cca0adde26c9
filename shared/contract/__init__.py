"""The wire contract: one pydantic model per message (jobs, results, tensors) and the codec that decodes a
delivery once at the edge, returning a typed job, a refusal or an undecodable message, never raising."""
