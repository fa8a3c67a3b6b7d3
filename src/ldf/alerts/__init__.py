"""Alert distribution (LDM-230 4.3): archive, per-broker feeds, manifests, replay, mini-broker.

See ``docs/alerts.md``. The service accepts alert packets from producers, stores each once
(idempotent on alertId) in an append-only log before it acknowledges, and presents every alert
to every feed exactly once through a cursor per feed.
"""
