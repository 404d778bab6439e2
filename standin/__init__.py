"""Corral's stand-in Rancher server (``corral server``) and its control CLI (``corral ctl``).

Modules: ``keys`` (API keys, Basic auth), ``journal`` (recording + long-poll waits), ``store``
(SQLite-backed resources and the global revision), ``cattle`` (what the real server does on a
mutation: container names, IPs, reporter hosts), ``health`` (the health aggregation rule),
``answers`` (metadata answers, v1 document and v2 DEFLATE stream), ``bus`` (websocket
subscriptions, request/reply), ``faults``, ``public`` (the agent-facing HTTP API), ``admin``
(the admin HTTP API), ``app`` (wires it together), ``main``/``ctl`` (the commands).
"""
