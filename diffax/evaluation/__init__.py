"""Measuring what a trained model makes: class accuracy of digit samples (`digits_classifier`), the
Frechet distance over digits or Inception-v3 features with streaming statistics, and precision / recall
(`fid`).
"""
