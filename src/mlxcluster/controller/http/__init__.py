"""The HTTP surface: routes, request schemas, renderers, middleware, the dashboard."""
