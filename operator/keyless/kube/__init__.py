"""The only place that talks to Kubernetes API servers."""
from .client import Kube, KubeConfig, KubeError, resource_path

__all__ = ["Kube", "KubeConfig", "KubeError", "resource_path"]
