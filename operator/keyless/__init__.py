"""Keyless: Argo CD to tenant clusters with 60-second tokens instead of long-lived credentials."""

__version__ = "0.1.0"
