"""Attacks that measure what a trained model leaks: membership inference, audits, extraction."""
