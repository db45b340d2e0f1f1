"""What operators watch: Prometheus metrics (``telemetry.metrics``, exported by
``telemetry.exporter`` on workers and ``api.routes.metrics`` on the API), structured logs
(``telemetry.logs``) and the request context both carry (``telemetry.context``).

Imports point one way: api and workers import this package; it imports config, store and the model
layer's event types, and models know nothing of it (the metrics hang off ``models.events``).
Importing the package itself loads nothing.
"""
