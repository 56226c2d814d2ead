"""Routing: the worker registry, balancing, dispatch and its inbox, the cache index, migration."""
