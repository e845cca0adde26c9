"""Versioned ONNX models: the store interface, its implementations, manifests, export and the registry."""
