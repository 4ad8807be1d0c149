module keyless.dev/tests/clusterprofile-consumer

go 1.26

require sigs.k8s.io/cluster-inventory-api v0.0.0
