"""Tables as users have them: rows of named columns typed and turned into tensors, and rows read from
CSV and JSONL files."""
