"""The wire contract and plumbing both sides of inferq share: messages, errors, settings, topology, logging."""
