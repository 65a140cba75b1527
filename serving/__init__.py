"""Online half of freemerge: the engine that applies experts, and the Ray Serve app around it."""
