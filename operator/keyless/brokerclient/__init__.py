"""Clients of the broker's HTTP API (docs/CONTRACTS.md): the agent, the operator, `keyless doctor` (aio) and
`keyless token` (blocking, standard library only, for its start-up time).

Kept import-free on purpose: `keyless token` imports `keyless.brokerclient.reply` and `.blocking` on a hot path.
"""
