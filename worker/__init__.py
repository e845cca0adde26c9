"""The inference worker: consume jobs, batch them by model version, run onnxruntime, store, publish, ack."""
