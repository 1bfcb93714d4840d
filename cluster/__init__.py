"""The cluster layer: Ray Serve app, OpenAI API, pools, metrics, CLI. The only layer
that knows Ray."""
