"""Local Kubernetes control planes (etcd + kube-apiserver) for tests and the demo."""
