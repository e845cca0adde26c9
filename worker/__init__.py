"""The inference worker: receive, decode, batch by model version, run onnxruntime, store, publish, ack;
each step with its own small class (batcher, ack window, waiting, publishing, fetcher, runner)."""
