"""The credential agent: keeps one ExecCredential file per broker target fresh for Argo CD.

Kept import-free on purpose: `keyless token` imports `keyless.agent.exec_credential` on a hot path.
"""
