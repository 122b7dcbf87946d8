"""Measuring what a trained model makes (class accuracy of digit samples)."""
