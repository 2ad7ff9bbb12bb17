"""Structured pruning (NIRVANA, NTK saliency): not implemented yet; see README.md."""
