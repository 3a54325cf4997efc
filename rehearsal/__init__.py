"""The cluster, rehearsed on one machine: real services on loopback and pod-faithful task runs."""
