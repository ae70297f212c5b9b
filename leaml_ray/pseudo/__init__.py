"""Pseudo question/answer pairs: requests and decoding (generate), parsing and filters (filters), trainer exports
(export). The pseudo_qa stage (stages/pseudo_qa.py) runs them in that order."""
