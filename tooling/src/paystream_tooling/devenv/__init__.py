"""Local infrastructure for demos and tests: a Kafka broker and an embedded PostgreSQL.

The processor never imports this package; it only reads addresses from its settings.
"""
