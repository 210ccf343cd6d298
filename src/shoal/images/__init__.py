"""Images: the layer store and the base image."""
