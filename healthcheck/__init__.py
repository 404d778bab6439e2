"""Corral healthcheck: HAProxy-driven container health checks reported to the server.

Modules: ``desired`` (pure: metadata -> checks), ``haproxy`` (config, process, runtime API,
stats), ``reports`` (pure state machine + delivery pool), ``main`` (the daemon).
See docs/healthcheck.md.
"""
