"""Formats every layer shares (no dependencies): the option letters of multiple-choice questions."""

LETTERS = "ABCDEFGHIJ"
