"""Tenant guardrails: admission webhooks that keep each tenant's Argo CD Applications and
ApplicationSets on that tenant's clusters.

- `directory`: who owns which project and cluster, built from RemoteTenantCluster specs (pure).
- `policy`: the decisions (pure): allow/deny with a message that says what is allowed instead,
  and the JSON patch that gives a destination-less Application its tenant's cluster.
- `configuration`: renders the Validating/MutatingWebhookConfiguration (pure).
- `serving`: the TLS webhook server (certificate files reloaded on change).
- `watch`: keeps the directory current from a list + watch of RemoteTenantClusters.
- `handlers`: the kopf admission handlers and `configure_admission()`.
"""
