"""Structured sparse fine-tuning (S2FT): not implemented yet; see README.md."""
