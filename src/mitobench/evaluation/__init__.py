"""Metrics with atypical as the positive class, bootstrap CIs, and the paper-form report."""
