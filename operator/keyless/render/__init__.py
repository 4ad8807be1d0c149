"""Pure rendering: spec in, Kubernetes objects out; never any I/O."""
