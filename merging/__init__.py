"""Offline half of freemerge: task zoo, task vectors, FR/FREE merging and the artifact."""
