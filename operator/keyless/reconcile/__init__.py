"""One reconcile step per derived object, each owning one condition."""
