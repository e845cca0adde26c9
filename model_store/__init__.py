"""Versioned ONNX models: the store interface, file and S3 stores, manifests, the verified cache, the
registry that resolves aliases, guarded alias moves and their history, input signatures, and scikit-learn
conversion (the sklearn extra)."""
