"""State every controller shares through NATS JetStream: API keys (a KV bucket) and usage (a stream and a bucket)."""
