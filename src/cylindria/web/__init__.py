"""The HTTP API: thin handlers, their parameters, and the rendering of every body."""
