"""Ray Serve deployments: the ZMQ ingress, the embodiment router and the batched policy replicas."""
