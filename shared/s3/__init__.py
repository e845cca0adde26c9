"""S3 plumbing the model, result and monitor stores share: locations (no boto3 needed), the boto3 client
with error translation, and the lean signed PUT on kept-alive connections."""
