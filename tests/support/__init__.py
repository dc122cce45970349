"""Helpers the tests share; tests import these, never each other."""
