"""Metering: API keys and rate limits, request timing and monitoring, the exporters' event feed."""
