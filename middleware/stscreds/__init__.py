"""stscreds: per-request temporary AWS credentials for ASGI and WSGI apps."""
