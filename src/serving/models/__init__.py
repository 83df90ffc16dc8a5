"""Model layer: the registry, the runners (hook contract) and the Ray Serve deployments."""
