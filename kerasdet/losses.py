"""Losses shared by every detector."""
